"""Documents in a prompt, priced before the call: an inline PDF by its pages, anything the
limiter cannot see or read refused (the provider would bill what we cannot reserve).

Both providers bill a PDF page as its extracted text plus an image of the page. Anthropic
documents 1,500-3,000 text tokens a page; OpenAI publishes no figure and bills the same
two parts. A page is reserved at ``PDF_PAGE_TEXT_TOKENS`` plus the model's ``image_tokens``.

Core module: no Flask or redis import.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from typing import Any

PDF_PAGE_TEXT_TOKENS = 3000   # Anthropic's documented top of the per-page text range
MAX_PDF_PAGES = 1000          # far above either provider's own cap (100 / a few hundred)
_PDF = "application/pdf"


class UnpricedContent(ValueError):
    """A part whose size only the provider can see (a document or file by URL or id, or one
    the limiter cannot read): it cannot be reserved before the call, so it is refused before
    anything is charged."""


def pdf_pages(data: str) -> int:
    """Pages of a base64 PDF (a ``data:application/pdf;base64,`` URL or bare base64)."""
    head, comma, body = data.partition(",")
    if comma and head.startswith("data:"):
        if not head.lower().startswith("data:" + _PDF) or not head.endswith(";base64"):
            raise UnpricedContent("Only PDF files can be sent inline (data:application/pdf;"
                                  "base64,...).")
        data = body
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UnpricedContent("The document is not valid base64.") from None
    try:
        from pypdf import PdfReader
        pages = len(PdfReader(io.BytesIO(raw), strict=False).pages)
    except ImportError:
        raise UnpricedContent("PDFs cannot be priced on this server (pypdf is missing).") \
            from None
    except Exception:    # any way a hostile or broken PDF fails to parse: the caller's 400
        raise UnpricedContent("The PDF cannot be read, so its pages cannot be priced.") \
            from None
    if not 1 <= pages <= MAX_PDF_PAGES:
        raise UnpricedContent(f"A PDF must have 1 to {MAX_PDF_PAGES} pages to be priced.")
    return pages


def document_pages(part: Mapping[str, Any]) -> tuple[int, Any]:
    """(PDF pages, what else of the part is text to count, ``type`` left out) of a
    ``document`` (Anthropic) or ``file`` (OpenAI) part; raises UnpricedContent for one sent
    by URL or id, or not a PDF."""
    source = part.get("source")
    if part.get("type") == "document" and isinstance(source, Mapping):
        kind = source.get("type")
        rest: Any = {k: v for k, v in part.items() if k not in ("source", "type")}  # title...
        if kind == "base64":
            if source.get("media_type") != _PDF or not isinstance(source.get("data"), str):
                raise UnpricedContent("An inline document must be a PDF (media_type "
                                      "application/pdf) with base64 data.")
            return pdf_pages(source["data"]), rest
        if kind == "text":
            return 0, [rest, source.get("data")]
        if kind == "content":
            return 0, [rest, source.get("content")]
        raise UnpricedContent(f"A document sent by {kind!r} cannot be priced before the call; "
                              "send its content inline.")
    file = part.get("file")
    if part.get("type") == "file" and isinstance(file, Mapping):
        data = file.get("file_data")
        if not isinstance(data, str):
            raise UnpricedContent("A file sent by id cannot be priced before the call; send "
                                  "its content inline as file_data.")
        parts = [{k: v for k, v in part.items() if k not in ("file", "type")},
                 {k: v for k, v in file.items() if k != "file_data"}]
        return pdf_pages(data), parts
    raise UnpricedContent(f"A {part.get('type')} part without an inline source cannot be "
                          "priced before the call.")

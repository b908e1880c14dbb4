"""Provider failures as one exception with a status and a code, never a 500."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from limiting.core.lease import provider_billed, status_billed
from limiting.core.upstream import refused_alone, retry_after

from .clients import watching

# The SDKs are imported where a call is made (providers/clients.py), not here: importing both
# takes about a second, which every `flask limits ...` command would pay for nothing.
_SDKS = ("openai", "anthropic")


def sdk_errors(name: str) -> tuple[type[Any], ...]:
    """The exception class ``name`` of each SDK imported so far (one never imported raised
    nothing)."""
    found = (getattr(sys.modules.get(sdk), name, None) for sdk in _SDKS)
    return tuple(cls for cls in found if cls is not None)  # (one still importing has none yet)


class UpstreamError(Exception):
    """A provider failure. ``status`` is the status we answer with; ``billed`` False says the
    provider certainly did not bill (the reservation is then cancelled, else charged)."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: int | None = None, *, billed: bool = True,
                 upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.billed = billed
        self.upstream_status = upstream_status

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.retry_after:
            body["retry_after"] = self.retry_after
        return body


def _retry_after(headers: Any) -> int | None:
    """Whole seconds for the caller's Retry-After, read and bounded as the guard reads it."""
    seconds = retry_after(headers) if headers is not None else None
    return max(1, math.ceil(seconds)) if seconds is not None else None


TOO_LARGE = "request_too_large_for_upstream"


Observe = Callable[[Mapping[str, str], int, int], None]  # headers, status, tokens reserved
T = TypeVar("T")


def guarded_call(provider: str, observe: Observe, tokens: int, send: Callable[[], T]) -> T:
    """Run one SDK call; any failure leaves as UpstreamError (the provider's HTTP answer shown
    to the model's guard first), never as an SDK or transport exception. A failure before
    the request left is not billed: the provider never saw it."""
    with watching() as sent:
        try:
            return send()
        except Exception as exc:
            if not sent:
                raise unsent_error(exc, provider) from None
            raise status_error(exc, provider, observe, tokens) from None


def unsent_error(exc: Exception, provider: str) -> UpstreamError:
    """A call that failed before its request left (``billed=False``: the reservation is
    cancelled). A body nested deeper than the SDK recurses is the caller's 400; anything else
    (a value the SDK cannot encode, a client it cannot build) is ours, a 502."""
    if isinstance(exc, RecursionError):
        return UpstreamError(400, "invalid_request",
                             f"The request is nested too deeply to send to the {provider} API.",
                             billed=False)
    return UpstreamError(502, "upstream_error",
                         f"The {provider} API call could not be made.", billed=False)


def status_error(exc: Exception, provider: str, observe: Observe, tokens: int) -> UpstreamError:
    """An SDK error as UpstreamError, its HTTP answer shown to the model's guard first. A
    refusal of this request alone is shown as the 413 it is, so it holds nobody else."""
    error = from_sdk(exc, provider, tokens)
    if isinstance(exc, sdk_errors("APIStatusError")):
        status = 413 if error.code == TOO_LARGE else exc.status_code
        observe(dict(exc.response.headers), status, tokens)
    return error


def from_sdk(exc: Exception, provider: str, tokens: int = 0) -> UpstreamError:
    """Map an OpenAI/Anthropic SDK exception; messages never echo keys or prompts.

    ``billed`` follows the reservation rule (limiting.lease.provider_billed): a connection never
    made and a refusal before generation (4xx, 503, 529) are not billed; a timeout, a read error
    and any other 5xx may have been. ``tokens`` is what the call reserved: a 429 for a request
    over the token limit the provider announced is about that request alone, a 400 and not a
    retry-later.
    """
    billed = provider_billed(exc)
    if isinstance(exc, sdk_errors("APITimeoutError")):
        return UpstreamError(504, "upstream_timeout", f"The {provider} API did not answer in time.",
                             billed=billed)
    if isinstance(exc, sdk_errors("APIConnectionError")):
        return UpstreamError(502, "upstream_unreachable",
                             f"The {provider} API could not be reached.", billed=billed)
    if isinstance(exc, sdk_errors("APIStatusError")):
        status = exc.status_code
        retry = _retry_after(exc.response.headers)
        if status in (400, 413, 429) and refused_alone(status, exc.response.headers,
                                                       getattr(exc, "body", None), tokens):
            return UpstreamError(400, TOO_LARGE,
                                 f"This request alone is more than the {provider} API allows "
                                 "for this model; send fewer input tokens or a lower "
                                 "max_tokens. Retrying will not help.",
                                 billed=False, upstream_status=status)
        kw: dict[str, Any] = {"billed": status_billed(status), "upstream_status": status}
        if status == 429:
            return UpstreamError(503, "upstream_rate_limited",
                                 f"The {provider} API is saturated; retry later.", retry or 1, **kw)
        if status == 529 or status == 503:
            return UpstreamError(503, "upstream_overloaded",
                                 f"The {provider} API is overloaded; retry later.", retry or 1,
                                 **kw)
        if status in (401, 403):
            return UpstreamError(502, "upstream_auth_failed",
                                 f"The server's {provider} credentials were refused.", **kw)
        if 400 <= status < 500:
            return UpstreamError(400, "upstream_rejected",
                                 f"The {provider} API rejected the request (HTTP {status}).", **kw)
        return UpstreamError(502, "upstream_error", f"The {provider} API failed (HTTP {status}).",
                             **kw)
    return UpstreamError(502, "upstream_error", f"The {provider} API call failed.", billed=billed)

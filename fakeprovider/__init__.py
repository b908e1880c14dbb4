"""A local fake LLM provider speaking the real OpenAI and Anthropic HTTP protocols.

Tests use :class:`FakeProvider` in-process; the benchmark runs
``python -m fakeprovider``. Token counting is in :mod:`fakeprovider.tokens`.

The bill meter
--------------
The fake keeps its own meter of what it would bill, the way a real provider
bills: for the work it *did*, whether or not the client read it. A bill audit
checks the limiter's charges against it (``fp.meter()``, after ``fp.quiesce()``).

What counts, per request the fake **accepted** (a credential, a valid body,
within its own rate limits, no injected failure):

* **the prompt**, at acceptance: its prompt token count, split as its usage
  reports it into fresh ``input_tokens``, ``cached_input_tokens`` (cache reads)
  and ``cache_write_tokens`` (Anthropic cache creation; OpenAI reports none);
* **output as generated**: a plain reply is generated whole and billed before
  it is written; a stream bills each chunk's tokens as the chunk is produced,
  before writing it, so the chunk whose write fails because the client hung up
  is billed, and generation stops there (a little after the client's close: the
  server notices on a failed write). A stream the fake breaks itself
  (``disconnect_mid_stream``) is billed for the chunk it sent before breaking;
* **a client that gave up while the reply was being made** (the fake's
  ``delay`` outlasted the client's timeout, plain or streamed): the whole reply,
  as a provider finishes the work nobody will read.

What does not count: 401, 400 and other 4xx answers, 404/405 routes, injected
failures (``fail_next``: 429, 500, 529, any status) and refusals by the fake's
own rpm/tpm limits. Nothing is billed twice: a request is billed its prompt
once and each output token once.

Dollars: ``FakeProvider(prices={"model": {"input": usd_per_million, "output": ...,
"cached_input": ..., "cache_write": ...}})`` or ``fp.set_prices(...)`` (applies
to requests accepted afterwards). A missing ``cached_input``/``cache_write``
price is the input price; a model with no price bills $0 but its tokens still
count. ``fp.meter()`` returns a :class:`MeterReading`: totals (``input_tokens``,
``cached_input_tokens``, ``cache_write_tokens``, ``output_tokens``, ``usd``,
``requests_billed``; ``prompt_tokens`` and ``total_tokens`` derived) and the
same ``by_model`` and ``by_key`` (the API key the fake received, without
"Bearer "). ``fp.reset_meter()`` zeroes it; ``fp.reset()`` also restores the
constructor's prices. ``fp.quiesce(timeout)`` waits until no request is in
progress (read by the server and not yet finished, delays included), so the
reading is final; a reply the client read to its end is already metered.
"""

from __future__ import annotations

from .meter import Bill, MeterReading
from .provider import FakeProvider
from .ratelimit import format_duration, parse_duration
from .state import RecordedRequest
from .tokens import count_words, prompt_tokens

__all__ = [
    "Bill",
    "FakeProvider",
    "MeterReading",
    "RecordedRequest",
    "count_words",
    "format_duration",
    "parse_duration",
    "prompt_tokens",
]

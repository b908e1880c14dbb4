"""One model call as every HTTP face describes it, whatever wire format it came in."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from limiting.core.pricing import STANDARD, PriceTerms


@dataclass(slots=True)   # not frozen: a frozen __init__ costs ~2 µs on /chat's hot path
class LLMRequest:
    """What to reserve for a call and what to send upstream.

    The faces (/v1's dialects, /chat) check their own fields and build this; the reservation,
    the provider call, echo and the settle read only it, so no flow depends on field names.
    """

    model: str
    provider: str                   # "openai", "anthropic", or "echo" (answered in-process)
    messages: list[dict[str, Any]]
    max_output: int                 # the answer's own limit, as sent upstream
    estimate: int                   # the offline input estimate
    params: dict[str, Any]          # the upstream body, in the provider API's own names
    stream: bool = False
    terms: PriceTerms = STANDARD
    system: Any = None              # a top-level system prompt (Anthropic's); echo counts it
    extra_output: int = 0           # billed as output beyond max_output (OpenAI's prediction)
    show_usage: bool = True         # the client asked for the usage chunk (include_usage)

    @property
    def reserved_output(self) -> int:
        """The output tokens reserved: all the provider may bill as output."""
        return self.max_output + self.extra_output

    def served_as(self, model: str) -> LLMRequest:
        """This call asking ``model`` upstream instead (a fallback the reservation served)."""
        return replace(self, model=model, params={**self.params, "model": model})

    @property
    def tokens(self) -> int:
        """The tokens the model's guard sees this call take."""
        return self.estimate + self.reserved_output

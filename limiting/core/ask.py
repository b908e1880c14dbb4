"""What one LLM request asks to reserve before its upstream call."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .codec import Costs
from .policy import ModelPolicy, Policy
from .pricing import STANDARD, PriceTerms, reserve_usd_micros, tier_multiplier


@dataclass(frozen=True, slots=True)
class Ask:
    """The model a request names (and its policy: None for the built-in echo), its input
    estimate, the most it may write, and the price terms (tier, cache writes, server tools)."""

    model_name: str
    model: ModelPolicy | None
    input_tokens: int
    max_output_tokens: int
    terms: PriceTerms = STANDARD
    key_id: str | None = None      # the API key it came with: the spend ledger books it too

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.max_output_tokens

    def costs(self, lease: str | None = None) -> Costs:
        """The request's cost in every unit, dollars priced at the dearest the terms allow:
        the settle gives back what the provider did not bill."""
        usd = round(reserve_usd_micros(self.model, self.input_tokens, self.max_output_tokens,
                                       self.terms))
        return Costs(self.tokens, self.input_tokens, self.max_output_tokens, usd, lease)


def fallback_asks(policy: Policy, ask: Ask) -> tuple[Ask, ...]:
    """``ask`` as each of its model's fallbacks would be asked, in order: the same tokens,
    priced at the fallback's prices. Its tier multiplier is the dearer of the asked one and
    the dearest the fallback lists (the request's own tier is not kept here): a reservation
    never below what the call can cost; the settle prices the tier the provider reports."""
    if ask.model is None or not ask.model.fallbacks:
        return ()
    out = []
    for name in ask.model.fallbacks:
        model = policy.model(name)
        tier = max(ask.terms.tier, tier_multiplier(model, None))
        out.append(replace(ask, model_name=name, model=model,
                           terms=replace(ask.terms, tier=tier)))
    return tuple(out)

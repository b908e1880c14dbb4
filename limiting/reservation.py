"""Reservations of LLM units (tokens, dollars, a concurrency lease) and their settlement.

A reservation's life is one rule, owned here::

    with limiter.reserve(user, model, input_tokens, max_output) as r:
        reply = call_the_provider()
        r.settle(Usage(...))          # what the provider reported

Entering starts renewing the lease (when the plan has one). Leaving without a settle applies
:meth:`Reservation.finish`: cancelled (every unit back) only when the provider certainly did
not bill; otherwise charged as reserved. Whatever happens, it finishes exactly once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from . import metrics
from .core.ask import Ask
from .core.codec import Kind, SettleCall, given_back
from .core.decision import Decision
from .core.layers import ESTIMATED_UNITS, Layer
from .core.lease import KeepAlive, provider_billed
from .core.llm import Usage
from .core.policy import ModelPolicy
from .core.pricing import reserve_usd_micros, served_terms, usage_usd_micros
from .ledger import Spender
from .stores.store import Store, StoreUnavailable
from .tracing import span

log = logging.getLogger("limiter.reservation")


@dataclass(frozen=True, slots=True)
class Charge:
    """One layer a reservation charged, and by how much."""

    layer: Layer
    key: str
    amount: float      # units reserved (a lease's id lives in Reservation)


# One settle item: (kind, b, delta or lease id), as SettleCall.add takes them.
_Fix = tuple[str, float, "str | float"]


def new_lease_id() -> str:
    return uuid.uuid4().hex


class Reservation:
    """What one admitted LLM request holds until it finishes; the first finish wins.

    Finishing is thread-safe: the keep-alive thread, a stream generator's ``finally`` and the
    response's ``call_on_close`` may race, and only one of them moves the counters.
    """

    def __init__(self, store: Store, decision: Decision, ask: Ask,
                 calls: Sequence[tuple[int, Sequence[Charge]]] = (), lease: str | None = None,
                 *, guard: tuple[int, Sequence[Charge]] = (0, ()), renews: bool = True,
                 spender: Spender | None = None) -> None:
        """What ``ask`` holds: per acquire call (one slot each: the user's first, an org's in
        a slot of its own) the store's clock at that call and what it charged, and the model's
        guard's windows likewise; each settled, refunded and renewed in a settle call of its
        own. Nothing charged (the store away, failing open): nothing to settle. ``spender``:
        whom the spend ledger books a settled call to (and its plan and model, for the
        metrics)."""
        self.store = store
        self.decision = decision
        self.groups = [*calls, guard]
        self.charged_at, self.charges = calls[0] if calls else (0, [])
        self.guard_charges = guard[1]
        self.lease = lease
        self.model: ModelPolicy | None = ask.model
        self.model_name = ask.model_name
        self.input_tokens = ask.input_tokens
        self.max_output_tokens = ask.max_output_tokens
        self.terms = ask.terms    # tier, cache writes, server tools: the settle prices with them
        self.spender = spender
        # A fallback model served instead of the one asked (model_name is then its name): the
        # upstream call must ask for this one.
        self.served_model: str | None = None
        self.done = False
        # False for answers made in-process (echo), which cannot outlive a lease.
        self.renews = renews
        self._lock = threading.Lock()
        self._keepalive: KeepAlive | None = None
        self._leased = lease is not None and any(
            c.layer.unit == "leases" for _, group in self.groups for c in group)
        if self._leased:
            metrics.count(metrics.LEASES_TAKEN)

    # --- the context manager ----------------------------------------------------------------------

    def __enter__(self) -> Reservation:
        self.start_renewal()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish(exc)

    def start_renewal(self) -> None:
        """Renew the lease every RENEW_EVERY seconds until finished (only if there is one)."""
        with self._lock:
            if self.done or self._keepalive is not None or not self.renews or not any(
                    c.layer.kind is Kind.LEASE for _, group in self.groups for c in group):
                return
            self._keepalive = KeepAlive(self).start()

    def finish(self, exc: BaseException | None) -> None:
        """The rule, for a reservation not settled yet: cancel only when ``exc`` says the
        provider certainly did not bill; anything else (no exception included) is charged as
        reserved. A no-op once finished."""
        if self.done:
            return
        if exc is not None and not provider_billed(exc):
            self.cancel()
        else:
            self.charge_reserved()

    def actual(self, layer: Layer, usage: Usage, as_reserved: bool = False) -> float:
        """What ``usage`` costs in ``layer``'s unit; cache reads never count as input.
        ``as_reserved``: dollars priced as reserve() priced them (the dearest input-side
        price of the terms), for a call charged as reserved."""
        fresh = max(0, usage.input_tokens - usage.cached_input_tokens)
        unit = layer.unit
        if unit == "tokens":
            return fresh + usage.output_tokens
        if unit == "input_tokens":
            return fresh
        if unit == "output_tokens":
            return usage.output_tokens
        if unit == "usd_micros":
            return round(self._usd(usage, as_reserved))
        return 0

    def _usd(self, usage: Usage, as_reserved: bool = False) -> float:
        if as_reserved:
            return reserve_usd_micros(self.model, usage.input_tokens, usage.output_tokens,
                                      self.terms)
        # Settled at the tier the provider says it served: a dearer one than reserved is
        # still what it bills (a request only names what it allows, the answer what it got).
        return usage_usd_micros(self.model, usage,
                                served_terms(self.model, self.terms, usage.service_tier))

    def settle(self, usage: Usage) -> None:
        """Charge what was really used and give back the rest of the reservation."""
        self._finish(usage)

    def cancel(self) -> None:
        """The provider certainly did not bill: every reserved unit is returned (the request
        itself still counts)."""
        self._finish(None)

    def charge_reserved(self, input_tokens: int | None = None) -> None:
        """The provider may have billed but said not what: keep everything reserved, except
        that an input count it did report replaces our estimate."""
        inputs = self.input_tokens if input_tokens is None else max(0, input_tokens)
        # Priced as reserve() priced it, so with the estimate as input every delta is 0.
        self._finish(Usage(inputs, self.max_output_tokens), as_reserved=True)

    def _claim(self) -> bool:
        """Mark finished; True for the one caller that got there first."""
        with self._lock:
            if self.done:
                return False
            self.done = True
            keepalive, self._keepalive = self._keepalive, None
        if keepalive is not None:
            keepalive.stop()
        if self._leased:
            metrics.count(metrics.LEASES_RETURNED)
        return True

    def _finish(self, usage: Usage | None, as_reserved: bool = False) -> None:
        if not self._claim():
            return
        counts = self._counted(usage, as_reserved) if usage is not None else None

        def settled(charge: Charge) -> _Fix | None:
            layer = charge.layer
            if layer.kind is Kind.LEASE:
                return given_back(layer, 0, self.lease)   # the lease released
            if layer.unit in ESTIMATED_UNITS:
                spent = self.actual(layer, usage, as_reserved) if usage is not None else 0
                if spent != charge.amount:
                    return layer.kind, layer.param, spent - charge.amount
            return None

        def book(own: SettleCall) -> SettleCall | None:
            """The spend ledger rides in the user's settle: no extra round trip on one
            server. A Cluster keeps the day-wide keys in the day's slot: a call of their own,
            returned to run after."""
            if counts is None or self.spender is None or not self.charged_at:
                return None
            apart = own if self.store.single_node else SettleCall(self.charged_at)
            self.spender.book(self.charged_at, counts, own, apart)
            return None if apart is own else apart

        with span("limiter.settle", {"limiter.as_reserved": as_reserved,
                                     "limiter.usage": usage is not None}):
            self._each_group(settled, book)

    def _counted(self, usage: Usage, as_reserved: bool) -> tuple[int, int, int, int, int]:
        """Count what a finished call was charged in the metrics; its ledger counts back
        (input not read from a cache, cached input, output, micro-dollars, one request)."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        raw_usd = self._usd(usage, as_reserved)
        usd = round(raw_usd)
        counts = (usage.input_tokens - cached, cached, usage.output_tokens, usd, 1)
        # Each write is a locked mmap update in multiprocess mode: skip the zeros.
        for counter, value in zip((metrics.INPUT_TOKENS, metrics.CACHED_TOKENS,
                                   metrics.OUTPUT_TOKENS), counts, strict=False):
            if value > 0:
                counter.inc(value)
        if raw_usd > 0:
            metrics.USD_SETTLED.inc(raw_usd / 1e6)
        spender = self.spender
        if spender is not None:
            labels = (spender.plan, spender.model)
            metrics.SPEND_REQUESTS.labels(*labels).inc()
            if usd > 0:
                metrics.SPEND_USD.labels(*labels).inc(usd / 1e6)
            for kind, value in zip(("input", "cached_input", "output"), counts, strict=False):
                if value > 0:
                    metrics.SPEND_TOKENS.labels(*labels, kind).inc(value)
        return counts

    def refund_everything(self) -> None:
        """A later layer refused after this one committed: as if the request never came."""
        if not self._claim():
            return

        def refunded(charge: Charge) -> _Fix:
            return given_back(charge.layer, charge.amount, self.lease)

        # The guard's windows too: a waiter that hung up took a slot of the model's as well,
        # which would otherwise stay taken for everyone until it left the window.
        self._each_group(refunded)

    def renew(self) -> None:
        """Keep a streaming request's lease alive for another TTL."""
        if not self.done:
            self._each_group(lambda charge: (Kind.RENEW, charge.layer.param, self.lease or "")
                             if charge.layer.kind is Kind.LEASE else None)

    def _each_group(self, fix: Callable[[Charge], _Fix | None],
                    first: Callable[[SettleCall], SettleCall | None] | None = None) -> None:
        """One settle call per group of charges (one slot each): ``fix`` of every charge.
        ``first`` may add to the user's call (the first group), and return a call to run
        after it."""
        for i, (charged_at, charges) in enumerate(self.groups):
            call = SettleCall(charged_at)
            for charge in charges:
                item = fix(charge)
                if item is not None:
                    call.add(charge.key, *item)
            after = first(call) if first is not None and i == 0 else None
            self._run(call)
            if after is not None:
                self._run(after)

    def _run(self, call: SettleCall) -> None:
        if not call:
            return
        try:
            self.store.run("settle", call.keys, call.args)
        except StoreUnavailable as exc:
            # The reservation then ages out with its window, and the lease with its TTL.
            log.warning("settle failed, reservation left to expire: %s", exc)
            if self._leased:
                metrics.LEASES.labels("left_to_expire").inc()


"""The fake's own bill: what a real provider would charge for the work it did.

A bill audit compares the limiter's charges with this meter, so it must count
the way a provider bills — what it *generated*, not what a client managed to
read. The rules are in the :mod:`fakeprovider` docstring; this module is the
arithmetic and the locking.

Thread-safe: the server's loop bills from its thread while tests read, reset
and wait from theirs. Dollars are summed as exact fractions (prices are floats,
token counts ints) so a total over thousands of calls is the sum of the calls.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

PRICE_KEYS = ("input", "output", "cached_input", "cache_write")
PER_MILLION = 1_000_000
ZERO = Fraction(0)


@dataclass(frozen=True)
class Rates:
    """USD per million tokens for one model (unpriced models bill at zero)."""

    input: Fraction = Fraction(0)
    output: Fraction = Fraction(0)
    cached_input: Fraction = Fraction(0)
    cache_write: Fraction = Fraction(0)


FREE = Rates()


def parse_prices(prices: Mapping[str, Mapping[str, float]] | None) -> dict[str, Rates]:
    """Validate ``{"model": {"input": usd_per_million, ...}}``; raises ValueError on junk.

    A missing ``cached_input`` or ``cache_write`` is the input price: a fake that
    bills too little would let an under-charging limiter pass its audit.
    """
    table: dict[str, Rates] = {}
    for model, row in (prices or {}).items():
        if not isinstance(model, str) or not isinstance(row, Mapping):
            raise ValueError(f"prices: expected {{model: {{kind: usd}}}}, got {model!r}: {row!r}")
        unknown = set(row) - set(PRICE_KEYS)
        if unknown:
            raise ValueError(f"prices[{model!r}]: unknown keys {sorted(unknown)}")
        values = {k: _price(model, k, v) for k, v in row.items()}
        base = values.get("input", Fraction(0))
        table[model] = Rates(
            input=base,
            output=values.get("output", Fraction(0)),
            cached_input=values.get("cached_input", base),
            cache_write=values.get("cache_write", base),
        )
    return table


def _price(model: str, kind: str, value: Any) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"prices[{model!r}][{kind!r}]: expected a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"prices[{model!r}][{kind!r}]: expected a finite number >= 0")
    return Fraction(value)


@dataclass(frozen=True)
class Bill:
    """Tokens and dollars billed; ``input_tokens`` is the fresh (uncached) part of prompts."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    requests_billed: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Every prompt token: fresh + cache reads + cache writes."""
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens

    @property
    def total_tokens(self) -> int:
        """Prompt and output tokens together."""
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True)
class MeterReading(Bill):
    """Totals, plus the same per model and per API key (the credential the fake received)."""

    by_model: Mapping[str, Bill] = field(default_factory=dict)
    by_key: Mapping[str, Bill] = field(default_factory=dict)


class _Tally:
    """A mutable running bill (only touched under the meter's lock)."""

    __slots__ = ("cache_write", "cached", "fresh", "output", "requests", "usd")

    def __init__(self) -> None:
        self.fresh = self.cached = self.cache_write = self.output = self.requests = 0
        self.usd = Fraction(0)

    def add(
        self, fresh: int, cached: int, write: int, output: int, usd: Fraction, req: int
    ) -> None:
        self.fresh += fresh
        self.cached += cached
        self.cache_write += write
        self.output += output
        if usd:  # Fraction sums are slow; most fakes run unpriced
            self.usd += usd
        self.requests += req

    def freeze(self) -> Bill:
        return Bill(
            self.fresh, self.cached, self.cache_write, self.output, float(self.usd), self.requests
        )


class Generation:
    """One accepted request's running bill; the dialects call :meth:`output` per token produced."""

    def __init__(self, meter: Meter, model: str, key: str, rates: Rates) -> None:
        self._meter = meter
        self._model = model
        self._key = key
        self._rates = rates
        self.output_tokens = 0

    def output(self, tokens: int) -> None:
        """Bill ``tokens`` generated output tokens (before they are written: the work is done)."""
        if tokens > 0:
            self.output_tokens += tokens
            price = self._rates.output
            usd = tokens * price / PER_MILLION if price else ZERO
            self._meter._add(self._model, self._key, 0, 0, 0, tokens, usd, 0)


class Meter:
    """Totals by model and API key, prices, and the count of requests in progress."""

    def __init__(self, prices: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self._initial = parse_prices(prices)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._prices = dict(self._initial)
        self._clear()

    def _clear(self) -> None:
        self._total = _Tally()
        self._by_model: dict[str, _Tally] = {}
        self._by_key: dict[str, _Tally] = {}

    # --- test side ----------------------------------------------------------------------------
    def set_prices(self, prices: Mapping[str, Mapping[str, float]] | None) -> None:
        """Replace the price table; applies to requests accepted from now on."""
        table = parse_prices(prices)
        with self._lock:
            self._prices = table

    def reset(self, *, prices: bool = False) -> None:
        """Zero every total (and, with ``prices``, restore the constructor's prices).

        Requests still generating keep billing, into the fresh totals: quiesce first.
        """
        with self._lock:
            self._clear()
            if prices:
                self._prices = dict(self._initial)

    def reading(self) -> MeterReading:
        """A consistent snapshot of the totals."""
        with self._lock:
            total = self._total.freeze()
            return MeterReading(
                **{k: getattr(total, k) for k in Bill.__dataclass_fields__},
                by_model={m: t.freeze() for m, t in self._by_model.items()},
                by_key={k: t.freeze() for k, t in self._by_key.items()},
            )

    def quiesce(self, timeout: float | None = None) -> bool:
        """Wait until no request is in progress; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    # --- server side --------------------------------------------------------------------------
    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark one request in progress for :meth:`quiesce`, from parse to last byte."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                if self._busy == 0:
                    self._idle.notify_all()

    def open(self, model: str, key: str, fresh: int, cached: int, write: int,
             tier_price: float = 1.0) -> Generation:
        """Bill an accepted request's prompt; returns the handle its output is billed through.
        ``tier_price``: the service tier's multiplier of every price."""
        with self._lock:
            rates = self._prices.get(model, FREE)
        if tier_price != 1.0:
            times = Fraction(tier_price)
            rates = Rates(rates.input * times, rates.output * times,
                          rates.cached_input * times, rates.cache_write * times)
        usd = (
            fresh * rates.input + cached * rates.cached_input + write * rates.cache_write
        ) / PER_MILLION
        self._add(model, key, fresh, cached, write, 0, usd, 1)
        return Generation(self, model, key, rates)

    def _add(
        self,
        model: str,
        key: str,
        fresh: int,
        cached: int,
        write: int,
        output: int,
        usd: Fraction,
        req: int,
    ) -> None:
        with self._lock:
            for tally in (
                self._total,
                self._by_model.setdefault(model, _Tally()),
                self._by_key.setdefault(key, _Tally()),
            ):
                tally.add(fresh, cached, write, output, usd, req)

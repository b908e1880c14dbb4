"""The Lua scripts' calling convention, and the only module that knows its positions.

acquire.lua takes 4 arguments per layer (kind, a, b, cost; the kind as Layer.code writes it:
"B" a token bucket others reach too, which a waiter never puts in debt; a trailing "?" a
shadow layer), then optionally the deadline (µs) a request may wait for its slot (and
fallback models' alternatives: limiting/core/alternatives.py), and answers {allowed,
refusing layer (1-based, 0: none), wait_us, now_us, then remaining and reset_us per layer};
settle.lua
takes the acquire's now_us, then 3 arguments per layer (kind, b, delta or lease id), the
spend ledger's counters and rankings riding behind them (Kind.LEDGER_COUNTS, LEDGER_RANK). The
Redis store sends what this module encodes and memory:// decodes it, so the two can never
read a call differently.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from .windows import month_bounds

ACQUIRE_ARGS = 4      # kind, a, b, cost
SETTLE_ARGS = 3       # kind, b, delta
REPLY_HEAD = 4        # allowed, refusing layer, wait_us, now_us


def num_arg(value: float) -> str:
    """A number as the scripts read it: an integer without a point when it is one."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --- kinds and realms ---------------------------------------------------------------------------


class Kind(StrEnum):
    """A layer's kind as the scripts read it, and the rules that follow from it."""

    EDGE = "f"            # the per-IP fixed window, Flask-Limiter's keys: every attempt counts
    BUCKET = "b"          # a token bucket
    SHARED_BUCKET = "B"   # (code only) a bucket others reach too: a waiter never puts it in debt
    WINDOW = "w"          # a strict sliding window of requests (small slots)
    WIDE_WINDOW = "W"     # a sliding window of tokens or dollars (8-byte slots)
    MONTH = "m"           # a count per calendar month in UTC
    LEASE = "c"           # requests in flight: one lease each
    PACE = "p"            # the pacing learnt from a provider's headers (observe.lua writes it)
    # settle.lua only: renew a lease; the spend ledger's day hash and rankings.
    RENEW = "r"
    LEDGER_COUNTS = "h"
    LEDGER_RANK = "z"

    @classmethod
    def window_of(cls, unit: str) -> Kind:
        """A sliding window counting ``unit``: anything but requests needs 8-byte slots."""
        return cls.WINDOW if unit == "requests" else cls.WIDE_WINDOW

    def code(self, shared: bool = False, shadow: bool = False) -> str:
        """The kind as acquire.lua reads it: "B" a shared bucket; "?" marks a shadow layer."""
        code = Kind.SHARED_BUCKET.value if shared and self is Kind.BUCKET else self.value
        return code + "?" if shadow else code

    @property
    def undoable(self) -> bool:
        """Can an undo return its charge? Not the edge's (every attempt counts), nor pacing."""
        return self not in (Kind.EDGE, Kind.PACE)

    @property
    def per_ip(self) -> bool:
        """Counts an IP's requests, not a user's (not in a provider's request headers)."""
        return self is Kind.EDGE

    @property
    def corrected(self) -> bool:
        """Does a settle correct the estimate charged (a window's slot)? A guard's are."""
        return self in (Kind.WINDOW, Kind.WIDE_WINDOW)

    @property
    def calendar(self) -> bool:
        """Does its length depend on the date (RateLimit-Policy's w=, settle's month)?"""
        return self is Kind.MONTH

    def look(self, cost: int) -> str:
        """The cost argument of a template: a lease is filled in per request ("-": a look)."""
        return ("-" if cost == 0 else "") if self is Kind.LEASE else str(cost)


class Realm(StrEnum):
    """Whose keys: an API key's user's and a /chat body's user_id's never mix (nor orgs')."""

    KEY_USER = "u"
    BODY_USER = "b"
    KEY_ORG = "o"
    BODY_ORG = "ob"

    @property
    def org(self) -> Realm:
        """The realm of the org keys this realm's users spend."""
        return Realm.KEY_ORG if self is Realm.KEY_USER else Realm.BODY_ORG


# --- acquire --------------------------------------------------------------------------------------


class LayerArgs(Protocol):
    """What the codec reads of a layer (limiting.core.layers.Layer): its kind, the two
    numbers the script checks it by, and the unit its cost is counted in."""

    @property
    def kind(self) -> Kind: ...
    @property
    def code(self) -> str: ...   # the kind as the script reads it ("?": a shadow layer)
    @property
    def limit(self) -> float: ...
    @property
    def param(self) -> float: ...
    @property
    def unit(self) -> str: ...


def layer_args(kind: str, a: float, b: float, cost: str) -> list[bytes]:
    """One layer's four arguments. ``cost``: units to charge, "0" to only look, or for a
    concurrency layer the lease id ("-" to only look)."""
    return [kind.encode(), num_arg(a).encode(), num_arg(b).encode(), cost.encode()]


def template_args(layers: Iterable[LayerArgs], cost: int) -> tuple[bytes, ...]:
    """Every layer's arguments with ``cost`` (1: charge a request, 0: only look); a lease
    layer's id is left blank for the request to fill in (its look is "-")."""
    out: list[bytes] = []
    for layer in layers:
        out += layer_args(layer.code, layer.limit, layer.param, layer.kind.look(cost))
    return tuple(out)


@dataclass(slots=True)
class Costs:
    """One request's cost in each unit a layer can count: what the script is sent, and what
    a reservation records as charged for the settle to correct."""

    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd_micros: int = 0
    lease: str | None = None      # the lease id a concurrency layer holds

    def amount(self, unit: str) -> int:
        """Units charged in ``unit``: a request and a lease count one; pacing meters tokens."""
        if unit == "tokens" or unit == "pace":
            return self.tokens
        if unit == "input_tokens":
            return self.input_tokens
        if unit == "output_tokens":
            return self.output_tokens
        if unit == "usd_micros":
            return self.usd_micros
        return 1

    def arg(self, unit: str) -> str:
        return (self.lease or "") if unit == "leases" else str(self.amount(unit))


class AcquireCall:
    """One acquire.lua call: its keys and 4 arguments per layer, in the same order.

    Built from a plan's encoded template with this request's costs set by unit, or from
    layers priced whole (the model's guard); :meth:`join` puts another subject's layers
    behind these in one all-or-nothing call (the guard riding in the user's call on one
    server). The reply's first ``size`` layers are this call's own.
    """

    __slots__ = ("args", "keys")

    def __init__(self, keys: list[str], args: Sequence[bytes]) -> None:
        self.keys = keys
        self.args = args

    @classmethod
    def priced(cls, keys: list[str], template: Sequence[bytes],
               per_call: Iterable[tuple[int, str]], costs: Costs) -> AcquireCall:
        """``template`` with layer ``i`` of each ``(i, unit)`` in ``per_call`` charged this
        request's cost in that unit (tokens, dollars, the lease id)."""
        args = list(template)
        for i, unit in per_call:
            args[i * ACQUIRE_ARGS + 3] = costs.arg(unit).encode()
        return cls(keys, args)

    @classmethod
    def of(cls, keys: list[str], layers: Iterable[LayerArgs], costs: Costs) -> AcquireCall:
        """Every layer charged this request's cost in its unit."""
        return cls(keys, [arg for layer in layers for arg in layer_args(
            layer.code, layer.limit, layer.param, costs.arg(layer.unit))])

    def join(self, other: AcquireCall) -> AcquireCall:
        """One call checking these layers, then ``other``'s; nothing is charged unless all pass."""
        return AcquireCall(self.keys + other.keys, [*self.args, *other.args])

    @property
    def size(self) -> int:
        """How many layers the call holds (one key each)."""
        return len(self.keys)


@dataclass(frozen=True, slots=True)
class LayerCall:
    """One layer of an acquire call, decoded (memory:// runs it in Python)."""

    kind: str
    a: float
    b: float
    cost: str             # a number, or a lease id for "c" layers


def with_deadline(args: Sequence[bytes], max_wait_us: int) -> Sequence[bytes]:
    """The arguments with the deadline behind the layers' (0: none, sent exactly as before)."""
    return [*args, str(int(max_wait_us)).encode()] if max_wait_us > 0 else args


def decode_acquire(args: Sequence[Any], keys: int | None = None) -> list[LayerCall]:
    # The deadline (and alternatives), if any, are not layers.
    end = len(args) - len(args) % ACQUIRE_ARGS if keys is None else keys * ACQUIRE_ARGS
    return [LayerCall(_text(args[i]), float(args[i + 1]), float(args[i + 2]),
                      _text(args[i + 3]))
            for i in range(0, end, ACQUIRE_ARGS)]


def decode_max_wait(args: Sequence[Any], layers: int) -> float:
    """The deadline (µs) sent behind ``layers`` layers' arguments; 0 when none was."""
    extra = args[layers * ACQUIRE_ARGS:]
    return float(_text(extra[0])) if extra else 0.0


@dataclass(slots=True)   # not frozen: built on every request, and frozen __init__ is slower
class AcquireReply:
    """What acquire.lua answered. ``states`` holds (remaining, reset_us) per layer it reached
    (an edge refusal ends the call before the later layers)."""

    allowed: bool
    refused: int          # 1-based index of the refusing layer; 0 when allowed
    # Refused: until this request would pass; -1: never (its cost is over a limit).
    # Allowed: how long it sleeps until the slot it was admitted into (0: it runs now).
    wait_us: int
    now_us: int           # the store's clock at the call: which window slot it charged
    states: list[tuple[int, int]] = field(default_factory=list)
    served: int | None = None   # alternatives sent: the one that served (0: asked, refused)

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> AcquireReply:
        # Integers already (Redis replies and memory:// alike); slicing keeps it in C.
        if len(raw) & 1:   # odd: the alternative that served ends it
            odd = raw[REPLY_HEAD:-1]
            return cls(raw[0] == 1, raw[1], raw[2], raw[3],
                       list(zip(odd[::2], odd[1::2], strict=True)), raw[-1])
        states = list(zip(raw[REPLY_HEAD::2], raw[REPLY_HEAD + 1::2], strict=True))
        return cls(raw[0] == 1, raw[1], raw[2], raw[3], states)

    def encode(self) -> list[int]:
        out = [1 if self.allowed else 0, self.refused, self.wait_us, self.now_us]
        for remaining, reset in self.states:
            out += [remaining, reset]
        return out if self.served is None else [*out, self.served]

    @property
    def delay_us(self) -> int:
        """Admitted into a future slot: µs until it (0: now, or refused)."""
        return self.wait_us if self.allowed else 0

    @property
    def charged_at(self) -> int:
        """The store's time the charge was made as: a waiter's windows count its slot's."""
        return self.now_us + self.delay_us

    def refused_after(self, n: int) -> bool:
        """Did a layer past the first ``n`` refuse (e.g. the model's guard behind a user's)?"""
        return not self.allowed and self.refused > n

    def first(self, n: int) -> AcquireReply:
        """The reply as the first ``n`` layers saw it: refused only if one of them refused.
        Nothing was charged either way when any layer refused."""
        if self.refused_after(n):
            return AcquireReply(True, 0, 0, self.now_us, self.states[:n])
        # Allowed, a waiter's delay is the whole call's: every layer charged as then.
        return AcquireReply(self.allowed, self.refused, self.wait_us, self.now_us,
                            self.states[:n])


# --- settle ---------------------------------------------------------------------------------------


def given_back(layer: LayerArgs, amount: float, lease: str | None = None
               ) -> tuple[str, float, str | float]:
    """A settle entry (kind, param, delta) undoing a charge of ``amount`` on ``layer``: a
    bucket is told its capacity (its refill is capped there), a concurrency layer releases
    ``lease``, any other layer its own param."""
    if layer.kind is Kind.LEASE:
        return Kind.LEASE, layer.param, lease or ""
    if layer.kind is Kind.BUCKET:
        return Kind.BUCKET, layer.limit, -amount
    return layer.kind, layer.param, -amount


@dataclass(slots=True)
class SettleCall:
    """One settle.lua call: corrections to the layers an acquire at ``charged_at`` charged.

    Kinds: "w"/"W" add ``delta`` units to the charged slot (b = window in µs); "m" to the
    count of the month charged, if it still is the stored one (b = that month); "b" puts
    tokens back into a bucket (b = capacity); "c" releases the lease ``delta``; "r" renews
    it (b = the lease TTL in µs). The spend ledger (limiting/ledger.py): "h" adds
    :func:`ledger_counts` to a day's hash, "z" adds :func:`ledger_rank` to a day's sorted
    set; for both b = when the day's key expires (unix ms)."""

    charged_at: int
    keys: list[str] = field(default_factory=list)
    items: list[tuple[str, float, str | float]] = field(default_factory=list)

    def add(self, key: str, kind: str, b: float, delta: str | float) -> None:
        if kind == Kind.MONTH:
            # A month count names the month charged (the acquire's, by the store's clock),
            # so settle.lua need not know the calendar.
            b = month_bounds(self.charged_at)[0]
        self.keys.append(key)
        self.items.append((kind, b, delta))

    @property
    def args(self) -> list[str | int | float]:
        out: list[str | int | float] = [self.charged_at]
        for kind, b, delta in self.items:
            out += [kind, b, delta]
        return out

    def __bool__(self) -> bool:
        return bool(self.keys)


def decode_settle(args: Sequence[Any]) -> tuple[float, list[tuple[str, float, str]]]:
    """(charged_at, [(kind, b, delta or lease id)]) of a settle call, for memory://."""
    items = [(_text(args[i]), float(args[i + 1]), _text(args[i + 2]))
             for i in range(1, len(args), SETTLE_ARGS)]
    return float(args[0]), items


# --- observe ------------------------------------------------------------------------------------

# observe.lua's arguments: the provider's remaining requests and µs until they reset, its
# remaining tokens and their reset, then a hold (µs) every caller waits out; -1: unknown.
PACE_REQUESTS = 0          # remaining requests (their reset follows)
PACE_TOKENS = 2            # remaining tokens (their reset follows)
PACE_COUNTS = (PACE_REQUESTS, PACE_TOKENS)
PACE_HOLD = 4


def pace_args(requests_left: int, requests_reset_us: int, tokens_left: int,
              tokens_reset_us: int, hold_us: int) -> list[int]:
    """observe.lua's arguments, in its order."""
    return [requests_left, requests_reset_us, tokens_left, tokens_reset_us, hold_us]


# --- the spend ledger, riding in the settle call ------------------------------------------------

LEDGER_FIELDS = ("in", "cin", "out", "usd", "req")   # short hash fields: bytes per user per day


def ledger_counts(values: Sequence[int]) -> str:
    """A Kind.LEDGER_COUNTS item's delta: one integer per LEDGER_FIELDS name, in that order."""
    if len(values) != len(LEDGER_FIELDS):
        raise ValueError(f"ledger counts take {len(LEDGER_FIELDS)} values")
    return " ".join(str(int(v)) for v in values)


def ledger_rank(score: int, member: str) -> str:
    """A Kind.LEDGER_RANK item's delta: the score to add, then the member (it may hold
    spaces)."""
    return f"{int(score)} {member}"


def decode_ledger_counts(text: str) -> dict[str, int]:
    return dict(zip(LEDGER_FIELDS, (int(v) for v in text.split()), strict=True))


def decode_ledger_rank(text: str) -> tuple[int, str]:
    score, _, member = text.partition(" ")
    return int(score), member


# --- text replies: key.lua's, and whatever else a store answers ----------------------------------


def as_text(value: Any) -> str:
    """A reply as text: Redis answers bytes, memory:// str."""
    return value.decode() if isinstance(value, bytes) else str(value)


_text = as_text   # the decoders above read the scripts' arguments the same way


def decode_key(flat: Sequence[Any]) -> dict[str, str]:
    """key.lua's reply (HGETALL's flat field, value, ... list; empty: no such record) as the
    record's fields."""
    return {as_text(k): as_text(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}

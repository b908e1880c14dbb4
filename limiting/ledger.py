"""The spend ledger: who spent what, per UTC day, in the limiter's own store.

A settle books what a reservation really charged into day counters, in the same settle.lua
call (Kind.LEDGER_COUNTS and LEDGER_RANK): a hash per day for the user and for the API
key (both under the user's hash tag, so they ride in the user's own call on every topology),
and day-wide keys under the day's own tag ``{spend:YYYYMMDD}``: the day's total, one hash per
model, and the spenders ranked by micro-dollars and by tokens (overall and per model). On one
server all of it is one call; on a Cluster the day-wide keys are one more call, after.

An API key's tags (``--tag project=search``) are counted too, in the day-wide call: a hash
per tag and day, and the tag's spenders ranked (by dollars and by tokens).

The day is the acquire's, by the store's clock (the reservation's ``charged_at``), so a call
admitted at 23:59:59 UTC is booked to that day. Each day's keys expire on their own after
``[store] history_days``. A cancelled or refused call books nothing.

A call that named an end user of its key holder (limiting/core/end_users.py) also books into
the holder's own end-user counters, under the holder's hash tag (the same call as the
holder's hash): a hash per end user and day, and the day's end users ranked by micro-dollars
and by tokens. Their members and key names never hold the id as sent (JSON-quoted, digested).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from .core.codec import LEDGER_FIELDS, Kind, SettleCall, ledger_counts, ledger_rank
from .core.naming import digest, user_prefix, user_tag
from .stores.store import Store

COUNTS, RANK = Kind.LEDGER_COUNTS, Kind.LEDGER_RANK   # settle.lua's day hash, its rankings

DAY_US = 86_400 * 1_000_000
EPOCH = date(1970, 1, 1)


def day_of(us: float) -> int:
    """The UTC day (days since 1970-01-01) of a store timestamp in microseconds."""
    return int(us // DAY_US)


def day_text(day: int) -> str:
    return (EPOCH + timedelta(days=day)).isoformat()


def parse_day(text: str) -> int:
    """``YYYY-MM-DD`` as a day number; ValueError for anything else."""
    return (date.fromisoformat(text) - EPOCH).days


def _stamp(day: int) -> str:
    return (EPOCH + timedelta(days=day)).strftime("%Y%m%d")


def member(user: str, realm: str) -> str:
    """A ranking's member: the realm keeps a key's user and a /chat user_id apart. The id is
    JSON-quoted with every non-ASCII character escaped: a /chat user_id is the client's text,
    and one with a lone surrogate ("\\ud800") cannot travel to Redis as UTF-8 at all."""
    return f"{realm}:{json.dumps(user)}"


def from_member(text: str) -> tuple[str, str]:
    """(realm, user) of a ranking's member; one written before ids were JSON-quoted (still
    in the days kept) reads as its plain text."""
    realm, _, quoted = text.partition(":")
    try:
        user = json.loads(quoted)
    except ValueError:
        return realm, quoted
    return realm, user if isinstance(user, str) else quoted


class LedgerKeys:
    """Where each day's counters live."""

    def __init__(self, namespace: str = "rl:") -> None:
        self.namespace = namespace

    def user(self, user: str, realm: str, day: int) -> str:
        return f"{user_prefix(self.namespace, user, realm)}spend:{_stamp(day)}"

    def key(self, user: str, realm: str, key_id: str, day: int) -> str:
        return f"{user_prefix(self.namespace, user, realm)}spend:k:{key_id}:{_stamp(day)}"

    def end_user(self, user: str, realm: str, end_user: str, day: int) -> str:
        """One end user's day under their holder's tag (the id digested: hostile text)."""
        return f"{user_prefix(self.namespace, user, realm)}spend:e:{digest(end_user)}:" \
               f"{_stamp(day)}"

    def end_user_rank(self, user: str, realm: str, day: int, by: str = "usd") -> str:
        """The holder's end users of the day by ``by`` ("usd" or "tok")."""
        return f"{user_prefix(self.namespace, user, realm)}spend:erank:{by}:{_stamp(day)}"

    def _day(self, day: int) -> str:
        return f"{self.namespace}{{spend:{_stamp(day)}}}:"

    def total(self, day: int) -> str:
        return self._day(day) + "total"

    def model(self, day: int, model: str) -> str:
        return self._day(day) + "m:" + user_tag(model)

    def tag(self, day: int, tag: str) -> str:
        return self._day(day) + "t:" + user_tag(tag)

    def rank(self, day: int, by: str = "usd", model: str | None = None,
             tag: str | None = None) -> str:
        """Spenders of the day by ``by`` ("usd": micro-dollars, "tok": tokens), of one
        ``model`` or of the keys bearing one ``tag`` (or all)."""
        if tag is not None:
            return self._day(day) + f"rank:{by}:t:" + user_tag(tag)
        return self._day(day) + f"rank:{by}" + ("" if model is None else ":m:" + user_tag(model))


@dataclass(frozen=True, slots=True)
class Spend:
    """One subject's counters for one day."""

    day: int
    input_tokens: int = 0          # not read from a cache
    cached_input_tokens: int = 0
    output_tokens: int = 0
    usd_micros: int = 0
    requests: int = 0

    @classmethod
    def of(cls, day: int, fields: Mapping[str, Any]) -> Spend:
        got = [int(float(fields.get(name, 0) or 0)) for name in LEDGER_FIELDS]
        return cls(day, *got)

    @classmethod
    def sum(cls, days: Sequence[Spend]) -> Spend:
        """Several days added up, dated by the last."""
        return cls(days[-1].day if days else 0,
                   *(sum(getattr(s, name) for s in days) for name in (
                       "input_tokens", "cached_input_tokens", "output_tokens", "usd_micros",
                       "requests")))

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.output_tokens

    @property
    def usd(self) -> float:
        return self.usd_micros / 1e6

    def json(self) -> dict[str, Any]:
        return {"day": day_text(self.day), "requests": self.requests,
                "input_tokens": self.input_tokens,
                "cached_input_tokens": self.cached_input_tokens,
                "output_tokens": self.output_tokens, "tokens": self.tokens,
                "usd_micros": self.usd_micros, "usd": round(self.usd, 6)}


@dataclass(frozen=True, slots=True)
class Spender:
    """Who a reservation's spend is booked to, and under which plan and model (the
    Prometheus labels: bounded by the policy, never the user)."""

    keys: LedgerKeys
    user: str
    realm: str
    plan: str
    model: str
    key_id: str | None = None
    history_days: int = 35
    end_user: str | None = None   # the end user of ``user`` the call named
    tags: tuple[str, ...] = ()   # the API key's, each counted apart

    def book(self, charged_at: int, counts: Sequence[int], own: SettleCall,
             apart: SettleCall) -> None:
        """Add one settled call's ``counts`` (LEDGER_FIELDS order) to the day of
        ``charged_at``: the user's and key's hashes to ``own`` (the user's settle call, the
        same slot), the day-wide keys to ``apart`` (the same call on one server)."""
        day = day_of(charged_at)
        expires_ms = (day + 1 + self.history_days) * 86_400_000
        values = ledger_counts(counts)
        own.add(self.keys.user(self.user, self.realm, day), COUNTS, expires_ms, values)
        if self.key_id:
            own.add(self.keys.key(self.user, self.realm, self.key_id, day), COUNTS, expires_ms,
                    values)
        apart.add(self.keys.total(day), COUNTS, expires_ms, values)
        apart.add(self.keys.model(day, self.model), COUNTS, expires_ms, values)
        who = member(self.user, self.realm)
        usd, tokens = counts[3], counts[0] + counts[1] + counts[2]
        if usd:
            apart.add(self.keys.rank(day, "usd"), RANK, expires_ms, ledger_rank(usd, who))
            apart.add(self.keys.rank(day, "usd", self.model), RANK, expires_ms,
                      ledger_rank(usd, who))
        if tokens:
            apart.add(self.keys.rank(day, "tok"), RANK, expires_ms, ledger_rank(tokens, who))
        for tag in self.tags:
            self._book_tag(tag, day, expires_ms, values, usd, tokens, who, apart)
        if self.end_user is not None:
            self._book_end_user(day, expires_ms, values, usd, tokens, own)

    def _book_tag(self, tag: str, day: int, expires_ms: int, values: str, usd: int,
                  tokens: int, who: str, apart: SettleCall) -> None:
        """The tag's day and its spenders, under the day's tag: in the day-wide call."""
        apart.add(self.keys.tag(day, tag), COUNTS, expires_ms, values)
        for by, score in (("usd", usd), ("tok", tokens)):
            if score:
                apart.add(self.keys.rank(day, by, tag=tag), RANK, expires_ms,
                          ledger_rank(score, who))

    def _book_end_user(self, day: int, expires_ms: int, values: str, usd: int, tokens: int,
                       own: SettleCall) -> None:
        """The end user's day and rankings, under the holder's tag: in the holder's call."""
        assert self.end_user is not None
        own.add(self.keys.end_user(self.user, self.realm, self.end_user, day), COUNTS,
                expires_ms, values)
        who = json.dumps(self.end_user)   # ASCII: a lone surrogate still travels as UTF-8
        for by, score in (("usd", usd), ("tok", tokens)):
            if score:
                own.add(self.keys.end_user_rank(self.user, self.realm, day, by), RANK,
                        expires_ms, ledger_rank(score, who))


@dataclass(frozen=True, slots=True)
class TopRow:
    user: str
    realm: str
    score: int            # micro-dollars or tokens, as ranked
    spend: Spend          # the user's whole day (every model)

    def json(self) -> dict[str, Any]:
        return {"user": self.user, "realm": self.realm, "score": self.score,
                **self.spend.json()}


@dataclass(frozen=True, slots=True)
class EndUserRow:
    end_user: str
    score: int            # micro-dollars or tokens, as ranked
    spend: Spend          # the end user's whole day

    def json(self) -> dict[str, Any]:
        return {"end_user": self.end_user, "score": self.score, **self.spend.json()}


class Ledger:
    """Reads the ledger back: a subject's days, a day's top spenders, totals per day/model."""

    def __init__(self, store: Store, namespace: str = "rl:") -> None:
        self.store = store
        self.keys = LedgerKeys(namespace)

    def today(self) -> int:
        """Today in UTC by the store's clock (the same clock the ledger was written by)."""
        return day_of(self.store.now() * 1e6)

    def days(self, count: int, today: int | None = None) -> list[int]:
        """The last ``count`` days, oldest first, today included."""
        last = self.today() if today is None else today
        return list(range(last - max(1, count) + 1, last + 1))

    def history(self, user: str, realm: str, days: Iterable[int],
                key_id: str | None = None) -> list[Spend]:
        days = list(days)
        names = [self.keys.key(user, realm, key_id, d) if key_id else
                 self.keys.user(user, realm, d) for d in days]
        return [Spend.of(d, f) for d, f in zip(days, self.store.hashes(names), strict=True)]

    def totals(self, days: Iterable[int]) -> list[Spend]:
        days = list(days)
        rows = self.store.hashes([self.keys.total(d) for d in days])
        return [Spend.of(d, f) for d, f in zip(days, rows, strict=True)]

    def tag_totals(self, tag: str, days: Iterable[int]) -> list[Spend]:
        """What the keys bearing ``tag`` spent, per day."""
        days = list(days)
        rows = self.store.hashes([self.keys.tag(d, tag) for d in days])
        return [Spend.of(d, f) for d, f in zip(days, rows, strict=True)]

    def models(self, day: int, names: Iterable[str]) -> dict[str, Spend]:
        names = list(names)
        rows = self.store.hashes([self.keys.model(day, name) for name in names])
        return {name: Spend.of(day, f) for name, f in zip(names, rows, strict=True)
                if any(f.values())}

    def top(self, day: int, n: int = 20, model: str | None = None, by: str = "usd",
            tag: str | None = None) -> list[TopRow]:
        """The day's ``n`` biggest spenders, exact (the ranking holds every spender); with
        ``tag``, ranked by what they spent with keys bearing it (``spend``: their whole day)."""
        ranked = self.store.ranking(self.keys.rank(day, by, model, tag), n)
        who = [from_member(m) for m, _ in ranked]
        rows = self.store.hashes([self.keys.user(user, realm, day) for realm, user in who])
        return [TopRow(user, realm, int(score), Spend.of(day, f))
                for (realm, user), (_, score), f in zip(who, ranked, rows, strict=True)]

    def top_end_users(self, user: str, realm: str, day: int, n: int = 20, by: str = "usd"
                      ) -> list[EndUserRow]:
        """Key holder ``user``'s ``n`` biggest-spending end users of ``day``, exact."""
        ranked = self.store.ranking(self.keys.end_user_rank(user, realm, day, by), n)
        ids = [_quoted(m) for m, _ in ranked]
        rows = self.store.hashes([self.keys.end_user(user, realm, e, day) for e in ids])
        return [EndUserRow(e, int(score), Spend.of(day, f))
                for e, (_, score), f in zip(ids, ranked, rows, strict=True)]


def _quoted(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text

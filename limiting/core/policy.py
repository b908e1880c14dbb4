"""The policy: one typed object loaded from the TOML file and checked before the first request.

A bad file must fail at start, naming file, key and reason, because a typo found by the
first paying user is a typo found too late.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from .capacity import read_reserve, read_shards
from .codec import Realm
from .lease import RENEW_EVERY
from .members import read_members, warn_removed
from .model_names import ECHO as ECHO  # re-exported: the built-in model's name
from .model_names import alias_map, check_fallbacks, read_fallbacks
from .policy_reader import MODES as MODES
from .policy_reader import FailMode as FailMode  # re-exported: the policy's public types
from .policy_reader import Mode as Mode
from .policy_reader import PolicyError as PolicyError
from .policy_reader import TableReader
from .policy_sections import JwtClaims as JwtClaims
from .policy_sections import alerts_webhook, aliases_of, check_end_user, check_tags, read_jwt_claims
from .routes import RouteLimit, parse_routes
from .windows import Window as Window  # re-exported: plans hold them

OVERRIDDEN = "+override:"   # an override plan's name: its plan's, this, whose ("u:alice")


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    burst: int
    refill_per_second: float
    quotas: tuple[Window, ...] = ()
    tokens_per_minute: int | None = None
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    budget_usd_per_day: float | None = None
    tokens_per_day: int | None = None            # a strict sliding day, as budget_usd_per_day
    budget_usd_per_month: float | None = None    # the calendar month in UTC, as "N per month"
    default_max_tokens: int = 1024
    lease_ttl_seconds: int = 60    # a killed worker's lease frees itself after this
    # Paid quotas fail closed by default: an outage must not become free usage.
    fail_rate: FailMode = "fail_open"
    fail_quota: FailMode = "fail_closed"
    # "shadow": every layer of the plan is decided, counted and reported, never refuses.
    mode: Mode = "enforce"
    # Wait up to this long for a slot instead of a 429 (the bucket, windows, model's guard).
    max_wait_seconds: float = 0.0
    # Shares of a quota, token or dollar window at which one alert goes out (limiting/alerts.py).
    alert_at: tuple[float, ...] = ()
    # end_user = {...}: each end user a key holder names (OpenAI's user, Anthropic's
    # metadata.user_id) meets these too, inside the holder's own limits.
    end_user: Plan | None = None
    fallbacks: bool = True   # its requests may be served by a model's fallbacks

    @property
    def meters_units(self) -> bool:
        """Does this plan limit tokens, dollars or requests in flight (not just requests)?"""
        return bool(self.tokens_per_minute or self.input_tokens_per_minute
                    or self.output_tokens_per_minute or self.budget_usd_per_day
                    or self.max_concurrent or self.tokens_per_day
                    or self.budget_usd_per_month)


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """The upstream guard and prices of one model, shared by every user of it.

    A price of None means "not priced": such a model may not meet a dollar budget. The prices
    that default from the input price are worked out in limiting/pricing.py.
    """

    name: str
    provider: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    input_usd_per_million: float | None = None
    output_usd_per_million: float | None = None
    # Prompt-cache reads are billed lower by providers; default: half the input price.
    cached_input_usd_per_million: float | None = None
    # Anthropic bills cache writes above input: 1.25x for 5 minutes, 2x for an hour.
    cache_write_usd_per_million: float | None = None
    cache_write_1h_usd_per_million: float | None = None
    # Per server-tool use (web search); None: requests with server tools are refused.
    server_tool_usd_per_use: float | None = None
    # Price multipliers by service tier; "auto", "default", "standard_only" are 1.0 unless listed.
    service_tiers: Mapping[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()   # dated snapshots billed at these prices
    # Longest model-wide hold a provider's retry-after may write (a day would stop everyone).
    max_hold_seconds: float = 60.0
    # Tokens reserved per image: what the provider may bill for one (see core/llm.py).
    image_tokens: int = 1600
    # "shadow": the guard's own windows (requests/tokens per minute) never refuse; the
    # provider's learnt pacing still holds, as the provider itself would refuse.
    mode: Mode = "enforce"
    # Shares of the guard's windows only these plans may use (limiting/core/capacity.py).
    reserve: Mapping[str, float] = field(default_factory=dict)
    shards: int = 1   # slots the guard's windows are spread over, each with its share
    fallbacks: tuple[str, ...] = ()   # served instead when it would refuse (core/fallbacks.py)

    @property
    def priced(self) -> bool:
        return self.input_usd_per_million is not None and self.output_usd_per_million is not None


class PlanOverrides(Protocol):
    """Operators' changes to one user's plan, kept outside the file (limiting/overrides.py);
    ``realm`` is naming.KEY_USER or BODY_USER (naming imports this module)."""

    def plan_for(self, user: str, realm: str, plan: Plan, plans: Mapping[str, Plan]) -> Plan: ...


@dataclass(frozen=True, slots=True)
class Policy:
    """The checked policy file (plans, users, orgs, models, routes, edge): what
    ``RateLimiter(app, policy=...)`` enforces; made by load_policy or parse_policy."""

    source: str
    edge_per_ip: tuple[str, ...]
    default_plan: str
    plans: Mapping[str, Plan]
    users: Mapping[str, str] = field(default_factory=dict)
    models: Mapping[str, ModelPolicy] = field(default_factory=dict)
    fail_edge: FailMode = "fail_open"
    timeout_ms: int = 50           # a decision's budget for connect and reply
    local_fallback: bool = False   # while the store is away, limit in memory per worker
    history_days: int = 35         # days the spend ledger keeps (limiting/ledger.py)
    aliases: Mapping[str, str] = field(default_factory=dict)   # alias -> model name
    overrides: PlanOverrides | None = field(default=None, compare=False, repr=False)
    # [orgs]: limits shared by every member, read as plans (burst 0: no requests bucket).
    orgs: Mapping[str, Plan] = field(default_factory=dict)
    user_orgs: Mapping[str, str] = field(default_factory=dict)   # [users] member -> org
    # [routes."blueprint.endpoint"]: limits of a route, as its decorators would set them
    routes: Mapping[str, tuple[RouteLimit, ...]] = field(default_factory=dict)
    jwt_claims: JwtClaims = field(default_factory=JwtClaims)
    alert_webhook_url: str | None = None    # [alerts] webhook_url: where alert events go
    # [tags."name=value"]: limits shared by every key that bears the tag (keys.py)
    tags: Mapping[str, Plan] = field(default_factory=dict)

    def resolve(self, user: str, key_plan: str | None = None, realm: str | None = None) -> Plan:
        """The plan ``user`` is limited by, the one lookup everyone uses: ``key_plan`` (an API
        key's) while the policy has it, else the user's own (``[users]``, else the default).

        A key naming a plan the policy no longer has (removed while keys still name it) gets
        the user's own, with one log line per name: removing a plan must not turn its keys'
        requests into 500s. An override for ``user`` in ``realm`` (default: the key user's
        with a ``key_plan``, else the /chat user_id's) applies on top."""
        plan = self._own(user, key_plan)
        if self.overrides is None:
            return plan
        realm = realm or (Realm.KEY_USER if key_plan is not None else Realm.BODY_USER)
        return self.overrides.plan_for(user, realm, plan, self.plans)

    def _own(self, user: str, key_plan: str | None) -> Plan:
        if key_plan is not None:
            # An override plan's name (the local fallback passes it on) means its plan.
            plan = self.plans.get(key_plan.partition(OVERRIDDEN)[0])
            if plan is not None:
                return plan
            warn_removed(self.source, "plan", key_plan,
                     f"their user's own plan ([users], else the default {self.default_plan!r})")
        return self.plans[self.users.get(user, self.default_plan)]

    def org_of(self, user: str, key_org: str | None = None) -> Plan | None:
        """The org ``user`` is charged to, by :meth:`resolve`'s rule: ``key_org`` (an API
        key's) while the policy has it, else the user's own ([users]), else none."""
        if key_org is not None:
            org = self.orgs.get(key_org)
            if org is not None:
                return org
            warn_removed(self.source, "org", key_org, "their user's own org ([users])")
        name = self.user_orgs.get(user)
        return None if name is None else self.orgs[name]

    def model(self, name: str) -> ModelPolicy | None:
        """The model ``name`` is billed and guarded as (an alias gives its model), or None."""
        found = self.models.get(name)
        if found is None and name in self.aliases:
            found = self.models.get(self.aliases[name])
        return found


_PROVIDERS = ("openai", "anthropic", ECHO)


def _plan(source: str, name: str, table: Any, org: bool = False, where: str = "") -> Plan:
    """A plan, or with ``org`` a shared subject's limits (an org's, a tag's, a plan's end
    users'; ``where`` names its table): any subset of a plan's layers (the requests bucket
    only when burst and refill_per_second are given)."""
    where = where or (f'orgs."{name}"' if org else f"plans.{name}")
    r = TableReader(source, where, table)
    rate = not org or "burst" in r.table or "refill_per_second" in r.table
    plan = Plan(
        name=name,
        burst=r.positive("burst", required=rate) or 0,
        refill_per_second=float(r.positive("refill_per_second", (int, float), required=rate)
                                or 0),
        quotas=r.windows("quotas"),
        tokens_per_minute=r.positive("tokens_per_minute"),
        input_tokens_per_minute=r.positive("input_tokens_per_minute"),
        output_tokens_per_minute=r.positive("output_tokens_per_minute"),
        max_concurrent=r.positive("max_concurrent"),
        budget_usd_per_day=r.positive("budget_usd_per_day", (int, float)),
        tokens_per_day=r.positive("tokens_per_day"),
        budget_usd_per_month=r.positive("budget_usd_per_month", (int, float)),
        default_max_tokens=1024 if org else r.positive("default_max_tokens", default=1024),
        lease_ttl_seconds=r.positive("lease_ttl_seconds", default=60),
        fail_rate=r.fail_mode("fail_rate", "fail_open"),
        fail_quota=r.fail_mode("fail_quota", "fail_closed"),
        mode=r.mode(),
        # A waiter holds a connection (a greenlet): minutes, not hours.
        max_wait_seconds=0.0 if org else r.seconds("max_wait_seconds", 300.0),
        alert_at=r.shares("alert_at"),
        end_user=None if org else _end_user(source, name, r.get("end_user", dict)),
        fallbacks=True if org else r.get("fallbacks", bool, True),
    )
    if plan.lease_ttl_seconds < 2 * RENEW_EVERY:
        # A lease renewed every RENEW_EVERY s must survive one late renewal.
        r.fail("lease_ttl_seconds", f"must be at least {2 * RENEW_EVERY:g} seconds (twice the "
               f"lease renewal interval), got {plan.lease_ttl_seconds!r}")
    if plan.max_concurrent and plan.max_wait_seconds >= plan.lease_ttl_seconds:
        # A waiter holds its lease unrenewed: it must not outlive the wait.
        r.fail("max_wait_seconds", f"must be under lease_ttl_seconds "
               f"({plan.lease_ttl_seconds}) while max_concurrent is set")
    r.done()
    return plan


def _end_user(source: str, name: str, table: dict[str, Any] | None) -> Plan | None:
    """``end_user = {...}``: layers for each end user a key holder names in a request."""
    if table is None:
        return None
    check_end_user(source, f"plans.{name}.end_user", table)
    return _plan(source, f"{name}.end_user", table, org=True, where=f"plans.{name}.end_user")


def _model(source: str, name: str, table: Any, plans: Mapping[str, Plan]) -> ModelPolicy:
    r = TableReader(source, f'models."{name}"', table)
    rpm, tpm = r.positive("requests_per_minute"), r.positive("tokens_per_minute")
    reserve = read_reserve(r, plans)
    provider = r.get("provider", str, required=True)
    if provider not in _PROVIDERS:
        r.fail("provider", f"must be one of {', '.join(_PROVIDERS)}, got {provider!r}")
    model = ModelPolicy(
        name=name,
        provider=provider,
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        input_usd_per_million=r.price("input_usd_per_million"),
        output_usd_per_million=r.price("output_usd_per_million"),
        cached_input_usd_per_million=r.price("cached_input_usd_per_million"),
        cache_write_usd_per_million=r.price("cache_write_usd_per_million"),
        cache_write_1h_usd_per_million=r.price("cache_write_1h_usd_per_million"),
        server_tool_usd_per_use=r.price("server_tool_usd_per_use"),
        service_tiers=MappingProxyType(r.multipliers("service_tiers")),
        aliases=aliases_of(r),
        max_hold_seconds=float(r.positive("max_hold_seconds", (int, float), default=60.0)),
        image_tokens=r.positive("image_tokens", default=1600),
        mode=r.mode(),
        reserve=MappingProxyType(reserve),
        shards=read_shards(r, (rpm, tpm), reserve),
        fallbacks=read_fallbacks(r),
    )
    r.done()
    return model


def _check_budgets(source: str, plans: Mapping[str, Plan],
                   models: Mapping[str, ModelPolicy]) -> None:
    """A dollar budget is only as good as the prices: an unpriced model would spend it free.
    ``plans`` by table ("plans.pro", 'orgs."acme"')."""
    budgets = [(where, "budget_usd_per_day" if plan.budget_usd_per_day
                else "budget_usd_per_month") for where, plan in plans.items()
               if plan.budget_usd_per_day or plan.budget_usd_per_month]
    if not budgets:
        return
    for name in unpriced(models):
        model = models[name]
        missing = "input_usd_per_million" if model.input_usd_per_million is None \
            else "output_usd_per_million"
        raise PolicyError(f'{source}: models."{name}".{missing}: is required while '
                          f"{budgets[0][0]} has {budgets[0][1]} (an unpriced model "
                          "would spend the budget for free)")


def unpriced(models: Mapping[str, ModelPolicy]) -> list[str]:
    """The models a dollar budget cannot count: served by a provider, with no prices."""
    return [name for name, model in models.items() if model.provider != ECHO and not model.priced]


def _edge(source: str, table: dict[str, Any]) -> tuple[list[str], FailMode]:
    """``[edge]``: Flask-Limiter's per-IP windows, and what they do while the store is away."""
    edge = TableReader(source, "edge", table)
    per_ip = edge.get("per_ip", list, [])
    for i, text in enumerate(per_ip):
        if not isinstance(text, str):
            edge.fail(f"per_ip[{i}]", f"must be a string like '20 per 10 seconds', got {text!r}")
        edge.window(f"per_ip[{i}]", text, own_units=False)   # Flask-Limiter reads these
    fail_edge: FailMode = edge.fail_mode("fail", "fail_open")
    edge.done()
    return per_ip, fail_edge


def _store(source: str, table: dict[str, Any]) -> tuple[int, bool, int]:
    """[store]: a decision's budget in ms, the local fallback, the ledger's days."""
    store = TableReader(source, "store", table)
    timeout_ms = store.positive("timeout_ms", default=50)
    local_fallback = store.get("local_fallback", bool, False)
    history_days = store.positive("history_days", default=35)
    store.done()
    return timeout_ms, local_fallback, history_days


def parse_policy(data: Mapping[str, Any], source: str = "<policy>") -> Policy:
    """Build a Policy from a dict with the policy file's schema (parsed TOML, or written in
    code), checking every key."""
    top = TableReader(source, "", dict(data))

    per_ip, fail_edge = _edge(source, top.get("edge", dict, {}))

    plans_table = top.get("plans", dict, required=True)
    if not plans_table:
        top.fail("plans", "needs at least one plan")
    plans = {name: _plan(source, name, table) for name, table in plans_table.items()}

    defaults = TableReader(source, "defaults", top.get("defaults", dict, {}))
    default_plan = defaults.get("plan", str, next(iter(plans)))
    if default_plan not in plans:
        defaults.fail("plan", f"names no plan under [plans]: {default_plan!r}")
    defaults.done()

    check_tags(source, top.get("tags", dict, {}))
    tags = {name: _plan(source, name, t, org=True, where=f'tags."{name}"')
            for name, t in top.get("tags", dict, {}).items()}
    orgs = {name: _plan(source, name, t, org=True)
            for name, t in top.get("orgs", dict, {}).items()}
    users, user_orgs = read_members(source, top.get("users", dict, {}), default_plan, plans,
                                    orgs)

    models = {n: _model(source, n, t, plans) for n, t in top.get("models", dict, {}).items()}
    aliases = alias_map(source, models)
    check_fallbacks(source, models, aliases)
    _check_budgets(source, {**{f"plans.{n}": p for n, p in plans.items()},
                            **{f'orgs."{n}"': o for n, o in orgs.items()},
                            **{f"plans.{n}.end_user": p.end_user for n, p in plans.items()
                               if p.end_user is not None}}, models)

    timeout_ms, local_fallback, history_days = _store(source, top.get("store", dict, {}))
    routes = parse_routes(source, top.get("routes", dict, {}))
    jwt_claims = read_jwt_claims(source, top.get("identity", dict, {}))
    webhook_url = alerts_webhook(source, top.get("alerts", dict, {}))
    top.done()
    return Policy(
        source=source,
        edge_per_ip=tuple(per_ip),
        default_plan=default_plan,
        plans=MappingProxyType(plans),
        users=MappingProxyType(dict(users)),
        models=MappingProxyType(models),
        fail_edge=fail_edge,
        timeout_ms=timeout_ms,
        local_fallback=local_fallback,
        history_days=history_days,
        aliases=MappingProxyType(aliases),
        orgs=MappingProxyType(orgs),
        user_orgs=MappingProxyType(user_orgs),
        routes=MappingProxyType(routes),
        jwt_claims=jwt_claims,
        alert_webhook_url=webhook_url,
        tags=MappingProxyType(tags),
    )


def load_policy(path: str | Path) -> Policy:
    """Read and check the TOML policy file at ``path`` (for ``RateLimiter(app, policy=...)``;
    a PolicyError names the file, key and reason)."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise PolicyError(f"{source}: (file): not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: (syntax): {exc}") from None
    return parse_policy(data, source)

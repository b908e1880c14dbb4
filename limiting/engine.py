"""One request → a plan (limiting/planner.py) → one executor (limiting/executor.py) → one
Decision, or one complete Reservation (its LLM units, an org's layers, an API key's tags'
layers, a route's limits and the model's guard included).

Tags are names (an API key's, core/policy_sections.py valid_tag); only those with a
``[tags."..."]`` table add layers, so a tag without one costs nothing here (the ledger still
counts its spend). The local fallback (the store away) knows plans and orgs only: tags'
limits are not applied there."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

from . import metrics
from .alerts import Alerts, crossings_of
from .core.ask import Ask, fallback_asks
from .core.codec import Costs
from .core.decision import Decision, GuardRefused, Refused, from_reply, joined, shadow_over
from .core.end_users import compile_end_user
from .core.groups import CallPlan, Group, Role
from .core.layers import CompiledPlan, Layer, compile_plan
from .core.naming import (
    KEY_USER,
    EdgeKeys,
    end_user_prefix,
    org_prefix,
    tag_prefix,
    user_prefix,
)
from .core.orgs import compile_org
from .core.policy import Plan, Policy
from .executor import Charged, Executor, Outcome
from .guard import ModelGuard, guard_wait, us
from .ledger import LedgerKeys, Spender
from .planner import Planner
from .reservation import Charge, Reservation, new_lease_id
from .stores.store import Store, StoreUnavailable

log = logging.getLogger("limiter.alerts")


class Engine:
    """Decides for a user, and for the caller's IP when the edge rides in the same call.

    ``edge`` holds the edge layers and their keys' builder when the store is one server, so
    the per-IP fixed window costs no extra round trip; otherwise Flask-Limiter checks it alone.
    """

    def __init__(self, store: Store, policy: Policy, namespace: str = "rl:",
                 edge: tuple[Layer, ...] = (), edge_keys: EdgeKeys | None = None) -> None:
        self.store = store
        self.policy = policy
        self.namespace = namespace
        self.edge, self.edge_keys = edge, edge_keys
        self.planner = Planner(policy, namespace, edge, edge_keys)
        self.executor = Executor(store)
        self.guard = ModelGuard(self.executor, self.planner.guard)
        self.ledger_keys = LedgerKeys(namespace)
        # While the shared store is away: the same layers in this process, limits shared out.
        self.fallback: Engine | None = None
        # alert_at's events (limiting/alerts.py); None: no alerts (the local fallback's).
        self.alerts: Alerts | None = None
        # The parts' own faces, as callers know them.
        self.compiled = self.planner.compiled
        self.edge_group = self.planner.edge_group
        self.refund = self.executor.refund
        self.peek_model = self.guard.peek
        self.max_hold = self.guard.max_hold
        self.observe = self.guard.observe
        self.observe_args = self.guard.observe_args

    def tag_tables(self, tags: Sequence[str]) -> list[Plan]:
        """The ``[tags."..."]`` tables of ``tags`` (an API key's): a tag without one, none."""
        if not tags:
            return []
        known = self.policy.tags
        return [known[tag] for tag in tags if tag in known]

    def acquire(self, user: str, ip: str | None = None, plan: Plan | None = None,
                realm: str = KEY_USER, org: Plan | None = None, *,
                end_user: str | None = None, tags: Sequence[str] = ()) -> Decision:
        """Check and, only if every user layer (and every layer of ``org``, of ``end_user``
        and of ``tags``, an API key's) passes, charge one request to ``user`` (and to
        ``org``, the end user, ``tags``). Never waits: :meth:`acquire_with` does."""
        return self.acquire_with(user, ip, plan or self.policy.resolve(user), realm, (),
                                 org, end_user=end_user, tags=tags).decision

    def acquire_with(self, user: str, ip: str | None, plan: Plan, realm: str,
                     extra: Sequence[Group], org: Plan | None = None,
                     max_wait: float = 0.0, *, end_user: str | None = None,
                     tags: Sequence[str] = ()) -> Outcome:
        """:meth:`acquire` with more groups (a route's limits) decided with the plan's (and
        ``org``'s and each tag's, as groups of their own). ``max_wait``: seconds the request
        may wait for a future slot (the decision's delay); what ``outcome.charged`` took
        gives it back. ``end_user``: the end user of ``user`` the request names, limited by
        ``plan.end_user`` in a group of its own (a plan without it: ignored)."""
        tables = self.tag_tables(tags)
        outcome = self.executor.run(self.planner.request(user, ip, plan, realm, extra, org,
                                                         us(max_wait), end_user, tables))
        self._notice(outcome, user, realm, plan, org, tables)
        if outcome.away and self.fallback is not None:
            # The local fallback knows plans (and orgs) only; the route limits' store is away,
            # and so are the end users' (limited here by their holder's share alone) and the
            # tags' (not limited there).
            fb, fb_plan, fb_org = self._in_fallback(user, plan, org)
            cause = outcome.decision.cause
            outcome.decision = fb.acquire(user, None, fb_plan, realm, fb_org)
            outcome.decision.degraded, outcome.decision.cause = True, cause
        return outcome

    def decide(self, groups: Sequence[Group], wait_us: int = 0) -> Outcome:
        """Check every group (a route's, the edge's) and charge them all only if all pass."""
        return self.executor.run(CallPlan(list(groups), wait_us))

    def reserve(self, user: str, plan: Plan, ask: Ask, *, ip: str | None = None,
                realm: str = KEY_USER, guard: bool = True, renews: bool = True,
                org: Plan | None = None, extra: Sequence[Group] = (),
                charged: list[Charged] | None = None, max_wait: float = 0.0,
                end_user: str | None = None, tags: Sequence[str] = (),
                fallbacks: bool = False) -> Reservation:
        """Charge one request to ``user`` and reserve its LLM units, with ``org``'s layers
        and ``extra``'s (a route's limits, whose charges are appended to ``charged``), then
        pass the model's guard (``guard=False``: skip it, as the local fallback does).
        ``renews=False``: an answer made in this process, whose lease needs no keep-alive.
        ``max_wait``: seconds it may wait for a future slot (refund_everything gives it back).
        ``end_user``: the end user of ``user`` the request names, with ``plan.end_user``'s
        layers (tokens and dollars settled as the user's) and counted in the spend ledger.
        ``tags``: the API key's; those with a table are charged too, and the ledger counts
        every one's spend.
        ``fallbacks``: the model's fallbacks may serve it (unless ``plan`` says no); the
        reservation then holds the served model (``served_model``), charged at its prices.

        Raises Refused (the user's, ``org``'s or a route's layers: nothing was charged) or
        GuardRefused (the model's guard: the charges were given back)."""
        if plan.end_user is None:
            end_user = None   # a plan that limits no end users ignores the id: no store work
        tables = self.tag_tables(tags)
        leases = plan.max_concurrent or (org is not None and org.max_concurrent) or (
            end_user is not None and plan.end_user is not None and plan.end_user.max_concurrent
        ) or any(t.max_concurrent for t in tables)
        costs = ask.costs(new_lease_id() if leases else None)
        spender = Spender(self.ledger_keys, user, realm, plan.name, ask.model_name, ask.key_id,
                          self.policy.history_days, end_user=end_user, tags=tuple(tags))
        asks = fallback_asks(self.policy, ask) if fallbacks and guard and plan.fallbacks else ()
        outcome = self.executor.run(self.planner.reservation(
            user, ip, plan, ask.model_name if guard else None, costs, realm, extra, org,
            us(max_wait), end_user, tables,
            [(alt.model_name, alt.costs(costs.lease)) for alt in asks]))
        if outcome.served is not None:
            # Served by a fallback: its ask (prices, model) is what is settled and booked.
            metrics.count(metrics.FALLBACKS.labels(ask.model_name, outcome.served.model))
            ask = next(alt for alt in asks if alt.model_name == outcome.served.model)
            costs = ask.costs(costs.lease)
            spender = replace(spender, model=ask.model_name, key_id=ask.key_id)
        if outcome.away:
            return self._reserve_away(user, plan, ask, outcome, realm, renews, spender, org)
        if outcome.guard_wait_us is not None:
            raise GuardRefused(ask.model_name, guard_wait(outcome.guard_wait_us),
                               outcome.decision)
        if not outcome.decision.allowed:
            raise Refused(outcome.decision)
        if charged is not None:
            charged += [item for item in outcome.charged if item[0].role is Role.ROUTE]
        self._notice(outcome, user, realm, plan, org, tables)
        reservation = self._reservation(outcome, ask, costs, renews, spender)
        if outcome.served is not None:
            reservation.served_model = ask.model_name
        return reservation

    def _notice(self, outcome: Outcome, user: str, realm: str, plan: Plan,
                org: Plan | None, tags: Sequence[Plan] = ()) -> None:
        """Alerts for the thresholds an admitted request crossed (rare: a store call each);
        a failure there is logged, never the request's."""
        alerts = self.alerts
        if alerts is None:
            return
        alerts.poll()
        if not outcome.decision.allowed or not (
                plan.alert_at or (org is not None and org.alert_at)
                or any(t.alert_at for t in tags)):
            return
        try:
            alerts.notice(crossings_of(outcome.charged, user, realm, plan, org, time.time(),
                                       tags))
        except Exception:
            log.warning("alerts: a crossing could not be recorded", exc_info=True)

    def _reservation(self, outcome: Outcome, ask: Ask, costs: Costs, renews: bool,
                     spender: Spender) -> Reservation:
        """What an admitted reservation holds: per call (one slot each, the user's first)
        the charges to settle; the guard's windows apart. A Cluster's route limits charged
        in calls of their own stay with the caller's ``charged``."""
        decision = outcome.decision
        calls: dict[tuple[int, str], list[Charge]] = {}
        guard: tuple[int, list[Charge]] = (0, [])
        one_server = self.store.single_node
        for group, at, states in outcome.charged:
            if group.role is Role.ROUTE and not one_server:
                continue   # charged in calls of their own: the caller's ``charged`` has them
            charges = [Charge(*charge) for charge in group.charges(states)]
            if group.role is Role.GUARD:   # its settle corrects its windows' estimates
                # Its shadow windows that would have refused charged nothing: logged only.
                decision.would_refuse += shadow_over(group.layers, states)
                guard = (at, [c for c in charges if c.layer.kind.corrected])
            else:
                calls.setdefault((at, "" if one_server else group.tag), []).extend(charges)
        return Reservation(self.store, decision, ask, [(at, c) for (at, _), c in calls.items()],
                           costs.lease, guard=guard, renews=renews, spender=spender)

    def _reserve_away(self, user: str, plan: Plan, ask: Ask, outcome: Outcome, realm: str,
                      renews: bool, spender: Spender, org: Plan | None = None) -> Reservation:
        """The store is away: the local fallback (no guard: the provider still has its own
        limits), else the failure policy; failing open holds nothing to settle."""
        if self.fallback is not None:
            fb, fb_plan, fb_org = self._in_fallback(user, plan, org)
            return fb.reserve(user, fb_plan, ask, realm=realm, guard=False, renews=renews,
                              org=fb_org)
        if not outcome.decision.allowed:
            raise Refused(outcome.decision)
        return Reservation(self.store, outcome.decision, ask, renews=renews, spender=spender)

    def _in_fallback(self, user: str, plan: Plan, org: Plan | None = None
                     ) -> tuple[Engine, Plan, Plan | None]:
        """The local fallback, with ``plan`` (the one given: a key's) and ``org`` as this
        worker's share of them."""
        fb = self.fallback
        assert fb is not None
        return (fb, fb.policy.resolve(user, plan.name),
                None if org is None else fb.policy.orgs.get(org.name))

    def charge_edge(self, ip: str) -> Decision | None:
        """Count a request that never reached acquire (bad input) at the edge, as any edge would."""
        group = self.planner.edge_group(ip)
        if group is None:
            return None
        try:
            reply = self.executor.call([group])
        except StoreUnavailable:
            return None
        assert self.planner.edge_only is not None
        return from_reply(self.planner.edge_only, reply)

    def peek(self, user: str, plan: Plan | None = None, realm: str = KEY_USER,
             org: Plan | None = None) -> Decision:
        """Every user layer's state for ``user`` (then ``org``'s), charging nothing."""
        compiled = compile_plan(plan or self.policy.resolve(user), cost=0, llm=True)
        prefix = user_prefix(self.namespace, user, realm)
        decision = from_reply(compiled, self.executor.look(
            [prefix + suffix for suffix in compiled.suffixes], compiled.args))
        return decision if org is None else joined(decision, self.peek_org(org, realm))

    def _look(self, compiled: CompiledPlan, prefix: str) -> Decision:
        """A shared subject's layers (compiled at cost 0) under ``prefix``, charging nothing."""
        return from_reply(compiled, self.executor.look(
            [prefix + layer.suffix for layer in compiled.layers], compiled.args))

    def peek_org(self, org: Plan, realm: str = KEY_USER) -> Decision:
        """Every layer of ``org`` (its key holders', or with BODY_USER its /chat user_ids'),
        charging nothing."""
        return self._look(compile_org(org, llm=True, cost=0),
                          org_prefix(self.namespace, org.name, realm))

    def peek_tag(self, tag: Plan) -> Decision:
        """Every layer of the tag table ``tag`` (shared by the keys bearing it), charging
        nothing."""
        return self._look(compile_org(tag, llm=True, cost=0, tag=True),
                          tag_prefix(self.namespace, tag.name))

    def peek_end_user(self, user: str, end_user: str, plan: Plan, realm: str = KEY_USER
                      ) -> Decision | None:
        """Every layer of ``end_user`` of key holder ``user`` on ``plan`` (None: the plan
        limits no end users), charging nothing."""
        if plan.end_user is None:
            return None
        return self._look(compile_end_user(plan.end_user, llm=True, cost=0),
                          end_user_prefix(self.namespace, user, realm, end_user))

    def reset(self, user: str, layer: str | None = None, plan: Plan | None = None,
              realm: str = KEY_USER) -> int:
        """Forget ``user``'s usage (one layer by name, or all); returns keys removed."""
        prefix = user_prefix(self.namespace, user, realm)
        layers = compile_plan(plan or self.policy.resolve(user), llm=True).layers
        keys = [prefix + lay.suffix for lay in layers if layer in (None, lay.name)]
        return self.store.delete(keys) if keys else 0

    def reset_org(self, org: Plan, layer: str | None = None, realm: str = KEY_USER) -> int:
        """Forget ``org``'s usage (one layer, by its name with or without "org:<name>/")."""
        prefix = org_prefix(self.namespace, org.name, realm)
        keys = [prefix + lay.suffix for lay in compile_org(org, llm=True).layers
                if layer in (None, lay.name, lay.name.partition("/")[2])]
        return self.store.delete(keys) if keys else 0

    def reset_tag(self, tag: Plan, layer: str | None = None) -> int:
        """Forget the tag table ``tag``'s usage (one layer, with or without "tag:<tag>/")."""
        prefix = tag_prefix(self.namespace, tag.name)
        keys = [prefix + lay.suffix for lay in compile_org(tag, llm=True, tag=True).layers
                if layer in (None, lay.name, lay.name.partition("/")[2])]
        return self.store.delete(keys) if keys else 0

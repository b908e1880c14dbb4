"""Turns a request into its plan (limiting/core/groups.py CallPlan): the edge, a route's
limits, the user's plan, an org, an end user of the key holder, an API key's tags and
the model's guard, each a Group with its layers, keys, costs and hash tag, in the order they
are charged. limiting/executor.py runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from .core.codec import AcquireCall, Costs
from .core.end_users import compile_end_user
from .core.groups import Alternative, CallPlan, Group, Role
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
from .guard import GuardKeys


class Planner:
    """A policy's plans compiled once each, and the Groups one request is made of.

    ``edge`` holds the edge layers and their keys' builder when the store is one server, so
    the per-IP fixed window costs no extra round trip; otherwise Flask-Limiter checks it alone.
    """

    def __init__(self, policy: Policy, namespace: str = "rl:", edge: tuple[Layer, ...] = (),
                 edge_keys: EdgeKeys | None = None) -> None:
        self.policy = policy
        self.namespace = namespace
        self.edge = edge
        self.edge_keys = edge_keys
        self.guard = GuardKeys(policy, namespace)
        self._cache: dict[tuple[Role, str, bool], CompiledPlan] = {}
        self.edge_only = compile_plan(None, edge) if edge else None

    def _compile(self, role: Role, plan: Plan, llm: bool,
                 make: Callable[[], CompiledPlan]) -> CompiledPlan:
        """One compiled form per role, name and ``llm``; made again when a reload gave that
        name a new Plan."""
        key = (role, plan.name, llm)
        compiled = self._cache.get(key)
        if compiled is None or compiled.plan is not plan:
            compiled = self._cache[key] = make()
        return compiled

    def compiled(self, plan: Plan, llm: bool = False) -> CompiledPlan:
        """``plan``'s layers behind the edge's (``llm``: its tokens, dollars, leases too)."""
        return self._compile(Role.PLAN, plan, llm,
                             lambda: compile_plan(plan, self.edge, llm=llm))

    def compiled_org(self, org: Plan, llm: bool = False) -> CompiledPlan:
        return self._compile(Role.ORG, org, llm,
                             lambda: replace(compile_org(org, llm=llm), plan=org))

    def compiled_tag(self, tag: Plan, llm: bool = False) -> CompiledPlan:
        return self._compile(Role.TAG, tag, llm,
                             lambda: replace(compile_org(tag, llm=llm, tag=True), plan=tag))

    def plan_group(self, compiled: CompiledPlan, user: str, ip: str | None,
                   realm: str = KEY_USER, costs: Costs | None = None) -> Group:
        """``compiled``'s layers for ``user`` (the edge's first, never given back) as a
        Group; ``costs``: a reservation's (its tokens, dollars and lease)."""
        prefix = user_prefix(self.namespace, user, realm)
        keys = [prefix + suffix for suffix in compiled.suffixes]
        if compiled.edge_count:
            assert self.edge_keys is not None
            keys = self.edge_keys(ip or "unknown") + keys
        return _group(compiled, keys, prefix, costs, Role.PLAN)

    def org_group(self, org: Plan, realm: str, costs: Costs | None = None) -> Group:
        """``org``'s layers as a Group of their own (its own hash tag): its request layers,
        and with ``costs`` (a reservation's) its tokens, dollars and requests in flight."""
        compiled = self.compiled_org(org, llm=costs is not None)
        prefix = org_prefix(self.namespace, org.name, realm)
        return _group(compiled, [prefix + layer.suffix for layer in compiled.layers], prefix,
                      costs, Role.ORG)

    def end_user_group(self, plan: Plan, holder: str, realm: str, end_user: str,
                       costs: Costs | None = None) -> Group | None:
        """``plan.end_user``'s layers for ``end_user`` of key holder ``holder`` as a Group of
        their own (its own hash tag), or None when the plan limits no end users (the id is
        then ignored: no store work)."""
        limits = plan.end_user
        if limits is None:
            return None
        llm = costs is not None
        compiled = self._compile(Role.END_USER, limits, llm,
                                 lambda: compile_end_user(limits, llm=llm))
        if not compiled.layers:   # e.g. only tokens, on a call that reserves none
            return None
        prefix = end_user_prefix(self.namespace, holder, realm, end_user)
        return _group(compiled, [prefix + layer.suffix for layer in compiled.layers], prefix,
                      costs, Role.END_USER)

    def tag_group(self, tag: Plan, costs: Costs | None = None) -> Group:
        """A tag's layers (``[tags."name=value"]``, shared by every key bearing it) as a
        Group under the tag's own hash tag, as an org's are."""
        compiled = self.compiled_tag(tag, llm=costs is not None)
        prefix = tag_prefix(self.namespace, tag.name)
        return _group(compiled, [prefix + layer.suffix for layer in compiled.layers], prefix,
                      costs, Role.TAG)

    def edge_group(self, ip: str) -> Group | None:
        """The edge's layers for ``ip`` when they ride in the store call (one server)."""
        if self.edge_only is None or self.edge_keys is None:
            return None
        return _group(self.edge_only, self.edge_keys(ip), "", None, Role.EDGE)

    def request(self, user: str, ip: str | None, plan: Plan, realm: str,
                extra: Sequence[Group] = (), org: Plan | None = None,
                wait_us: int = 0, end_user: str | None = None,
                tags: Sequence[Plan] = ()) -> CallPlan:
        """One request to ``user`` (``plan``'s layers), a route's ``extra``, ``org``'s,
        ``end_user``'s (when ``plan`` limits end users) and each of ``tags``' (the tables of
        the key's tags)."""
        compiled = self.compiled(plan)
        groups = self._groups(compiled, plan, user, ip, realm, extra, org, end_user, tags, None)
        return CallPlan(groups, wait_us, view=compiled if len(groups) == 1 else None)

    def reservation(self, user: str, ip: str | None, plan: Plan, model: str | None,
                    costs: Costs, realm: str = KEY_USER, extra: Sequence[Group] = (),
                    org: Plan | None = None, wait_us: int = 0,
                    end_user: str | None = None, tags: Sequence[Plan] = (),
                    fallbacks: Sequence[tuple[str, Costs]] = ()) -> CallPlan:
        """A reservation: ``user``'s plan with its LLM layers, a route's ``extra``, ``org``'s,
        ``end_user``'s and ``tags``' layers and the guard of ``model`` (None: no guard) on a
        random shard, with one other shard to try when that one is full. ``fallbacks``: the
        models to serve instead, in order, each with this request's costs at its prices (see
        Alternative)."""
        compiled = self.compiled(plan, llm=True)
        groups = self._groups(compiled, plan, user, ip, realm, extra, org, end_user, tags, costs)
        view = compiled if len(groups) == 1 else None
        if model is None:
            return CallPlan(groups, wait_us, view=view)
        guard, retry = self._guards(model, costs, plan)
        if not fallbacks:   # the hot path: as it was before fallbacks
            return CallPlan(groups, wait_us, guard, retry, view)
        alternatives = []
        for name, priced in fallbacks:
            alt = self._groups(compiled, plan, user, ip, realm, extra, org, end_user, tags,
                               priced)
            alternatives.append(Alternative(name, alt, *self._guards(name, priced, plan)))
        return CallPlan(groups, wait_us, guard, retry, view, tuple(alternatives))

    def _groups(self, compiled: CompiledPlan, plan: Plan, user: str, ip: str | None,
                realm: str, extra: Sequence[Group], org: Plan | None, end_user: str | None,
                tags: Sequence[Plan], costs: Costs | None) -> list[Group]:
        """The subjects one request charges, in order: the user's plan (with the edge's
        layers), a route's ``extra``, the org, the end user, the key's tags; ``costs``: a
        reservation's (its tokens, dollars and lease), None: one request each."""
        groups = [self.plan_group(compiled, user, ip, realm, costs), *extra]
        if org is not None:
            groups.append(self.org_group(org, realm, costs))
        if end_user is not None:
            self._add_end_user(groups, plan, user, realm, end_user, costs)
        groups += [self.tag_group(tag, costs) for tag in tags]
        return groups

    def _guards(self, model: str, costs: Costs, plan: Plan) -> tuple[Group | None, Group | None]:
        """``model``'s guard on a random shard, and on one other (None: one shard)."""
        shard, other = self.guard.shards(model)
        guard = self.guard.group(model, costs, plan.name, shard)
        retry = None if other is None else self.guard.group(model, costs, plan.name, other)
        return guard, retry

    def _add_end_user(self, groups: list[Group], plan: Plan, user: str, realm: str,
                      end_user: str, costs: Costs | None) -> None:
        group = self.end_user_group(plan, user, realm, end_user, costs)
        if group is not None:
            groups.append(group)


def _group(compiled: CompiledPlan, keys: list[str], tag: str, costs: Costs | None,
           role: Role) -> Group:
    """``compiled``'s layers on ``keys``, each charged one request or priced by ``costs``."""
    if costs is None:
        call = AcquireCall(keys, compiled.args)
        amounts: tuple[float, ...] = (1,) * len(compiled.layers)
    else:
        call = AcquireCall.priced(keys, compiled.args, compiled.per_call, costs)
        charged = [1.0] * len(compiled.layers)   # a request, or a lease
        for i, unit in compiled.per_call:
            charged[i] = costs.amount(unit)
        amounts = tuple(charged)
    # Bare layers (an org's, the edge's alone) compile as a plan's edge: only the edge's keep.
    kept = 0 if role in (Role.ORG, Role.END_USER, Role.TAG) else compiled.edge_count
    return Group(compiled.layers, call, tag, amounts, kept, role,
                 None if costs is None else costs.lease)


"""Orgs and tags: limits above users, shared by every member (every key bearing a tag),
decided with the member's own layers.

An org's limits are read as a plan's (``[orgs."acme"]`` takes any subset of a plan's keys);
its layers are named ``org:<name>/<layer>`` ("org:acme/quota-day", the requests bucket
"org:acme/rate") in 429 bodies, logs and RateLimit headers, and live under the org's own
hash tag (core/naming.py org_prefix), so one org's keys are one Cluster slot. A tag's
(``[tags."project=search"]``, for the keys made with ``--tag project=search``) are the same,
named ``tag:<tag>/<layer>`` under core/naming.py tag_prefix.
"""

from __future__ import annotations

from dataclasses import replace

from .layers import CompiledPlan, compile_plan, llm_layers, request_layers
from .policy import Plan


def org_layer_name(org: str, layer: str) -> str:
    return f"org:{org}/{'rate' if layer == 'user' else layer}"


def tag_layer_name(tag: str, layer: str) -> str:
    return f"tag:{tag}/{'rate' if layer == 'user' else layer}"


def compile_org(org: Plan, llm: bool = False, cost: int = 1, tag: bool = False
                ) -> CompiledPlan:
    """The script arguments of ``org``'s layers (request layers; with ``llm`` its tokens,
    dollars and requests in flight too), compiled bare as the model's guard is. ``tag``:
    ``org`` is a tag's table (its layers named ``tag:<tag>/...``)."""
    layers = request_layers(org) + (llm_layers(org) if llm else ())
    name = tag_layer_name if tag else org_layer_name
    # Every member reaches these: a waiter takes only what the org's bucket holds now.
    named = tuple(replace(layer, name=name(org.name, layer.name), shared=True)
                  for layer in layers)
    return compile_plan(None, named, cost)

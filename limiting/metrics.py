"""Prometheus metrics that add up across gunicorn workers (prometheus-client multiprocess mode).

With PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets and empties it at start), every
worker writes its counts to files there and /metrics sums them; without it, one process.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .core.flushing import Flusher
from .core.policy import OVERRIDDEN

# By plan too, for the per-plan refusal ratio: its values are the policy's plan names (an
# override's plan counts as the plan it derives from: never a user), "" where no plan was
# resolved yet (the edge's per-IP refusals, a route's own limits).
DECISIONS = Counter("llm_limiter_decisions_total",
                    "Limiter decisions by layer (the refusing one, or 'all'), outcome and plan.",
                    ["layer", "outcome", "plan"])
DECISION_SECONDS = Histogram("llm_limiter_decision_seconds",
                             "Time for one whole decision (the script call and its parsing); "
                             "one decision in 8 is timed.",
                             buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                                      0.1, 0.25, 1.0))
# Requests admitted into a future slot (a plan's max_wait_seconds): "served" slept until
# their slot; "abandoned" hung up while waiting and gave it back.
WAITS = Counter("llm_limiter_waits_total", "Requests that waited for their slot, by outcome.",
                ["outcome"])
WAIT_SECONDS = Counter("llm_limiter_wait_seconds_total", "Seconds requests waited for a slot.")
TOKENS_SETTLED = Counter("llm_limiter_tokens_settled_total",
                         "Tokens charged at settlement, by kind (input, cached_input, output).",
                         ["kind"])
USD_SETTLED = Counter("llm_limiter_usd_settled_total", "Dollars charged at settlement.")
# Per plan and model: both bounded by the policy file. Never a label per user or key: who
# spent what is the store's spend ledger (limiting/ledger.py), not Prometheus series.
SPEND_USD = Counter("llm_limiter_spend_usd_total",
                    "Dollars charged at settlement, by plan and model.", ["plan", "model"])
SPEND_TOKENS = Counter("llm_limiter_spend_tokens_total",
                       "Tokens charged at settlement, by plan, model and kind (input, "
                       "cached_input, output).", ["plan", "model", "kind"])
SPEND_REQUESTS = Counter("llm_limiter_spend_requests_total",
                         "Reservations settled or charged as reserved (not cancelled), by "
                         "plan and model.", ["plan", "model"])
ALERTS = Counter("llm_limiter_alerts_total",
                 "Alerts made (alert_at): one per subject, layer, threshold and window.",
                 ["layer", "threshold"])
GUARD_REFUSALS = Counter("llm_limiter_upstream_guard_refusals_total",
                         "Requests held back by a model's upstream guard.", ["model"])
FALLBACKS = Counter("llm_limiter_fallbacks_total",
                    "Requests served by a fallback model instead of the one asked.",
                    ["asked", "served"])
STORE_ERRORS = Counter("llm_limiter_store_errors_total",
                       "Store calls that failed or timed out, or were skipped by the breaker.",
                       ["reason"])
STORE_ROUND_TRIPS = Counter("llm_limiter_store_round_trips_total",
                            "Round trips that carried script calls, under gevent (see "
                            "store_script_calls: calls / round trips = calls per trip).")
STORE_SCRIPT_CALLS = Counter("llm_limiter_store_script_calls_total",
                             "Script calls carried by those round trips.")
WOULD_REFUSE = Counter("llm_limiter_would_refuse_total",
                       "Requests a shadow layer (mode = \"shadow\") would have refused and let "
                       "through, by layer.", ["layer"])
DENY_CACHE_HITS = Counter("llm_limiter_deny_cache_hits_total",
                          "Refusals answered from a worker's deny cache, without a store call "
                          "(also counted in llm_limiter_decisions_total).")
FAIL_POLICY = Counter("llm_limiter_fail_policy_total",
                      "Decisions made without the store: fail_open, fail_closed or fallback.",
                      ["outcome"])
# Concurrency leases: "taken" with a reservation, "returned" when it finished (settled,
# cancelled or charged as reserved), "left_to_expire" when that finish could not reach the
# store. taken - returned is leases in flight plus leaks (a worker killed mid-request): the
# lease-leak alert in deploy/prometheus/ watches it grow.
LEASES = Counter("llm_limiter_leases_total",
                 "Concurrency leases by event: taken, returned, left_to_expire.", ["event"])
# A plan's dollar budgets as the policy file sets them, so a rule can compare the spend rate
# with what the window allows (deploy/prometheus/). "mostrecent" over workers: after a
# reload (HUP) the new workers' values win over the files the old ones left behind.
PLAN_BUDGET_USD = Gauge("llm_limiter_plan_budget_usd",
                        "A plan's dollar budget per window (day or month), from the policy.",
                        ["plan", "window"], multiprocess_mode="mostrecent")

# Children bound once: a labels() lookup on every request is work the hot path need not do.
_ALLOWED: dict[str, Any] = {}   # plan name -> its allowed child
INPUT_TOKENS = TOKENS_SETTLED.labels("input")
CACHED_TOKENS = TOKENS_SETTLED.labels("cached_input")
OUTPUT_TOKENS = TOKENS_SETTLED.labels("output")
_REFUSED: dict[tuple[str, str], Any] = {}   # (layer, plan) -> its refused child (the policy's)
LEASES_TAKEN = LEASES.labels("taken")
LEASES_RETURNED = LEASES.labels("returned")


# --- the hot path's counts, buffered -------------------------------------------------------------
# In multiprocess mode every inc() and observe() is a locked write to a memory-mapped file
# (~2 µs); an admitted request made five. Counts of the admitted path are kept here instead
# and written at most FLUSH_SECONDS apart (by the next request, a /metrics scrape in this
# worker, the flusher thread while the worker is idle, or its exit), so /metrics lags by at
# most that. Refusals and failures are still written at once.
FLUSH_SECONDS = 1.0
# One decision in SAMPLE_EVERY is timed into llm_limiter_decision_seconds: its quantiles
# stay honest estimates, and its count is decisions / SAMPLE_EVERY.
SAMPLE_EVERY = 8

_pending: dict[Any, float] = {}
_lock = threading.Lock()
_flushed_at = time.monotonic()
_sampled = 0


def count(child: Any, amount: float = 1) -> None:
    """``child.inc(amount)``, buffered (see above)."""
    with _lock:
        _pending[child] = _pending.get(child, 0) + amount
    if time.monotonic() - _flushed_at >= FLUSH_SECONDS:
        flush()
    else:
        _flusher.wake()   # an idle worker's last counts still reach /metrics in time


def alert(layer: str, threshold: float) -> None:
    """One alert made (rare: counted at once, not buffered)."""
    ALERTS.labels(layer, f"{threshold:g}").inc()


def plan_label(plan: str) -> str:
    """The plan as a label: an override's plan ("pro+override:u:alice") as the policy's plan it
    derives from, so no user id ever becomes a series."""
    return plan.partition(OVERRIDDEN)[0]


def allowed(plan: str = "") -> None:
    """One admitted decision under ``plan``, buffered."""
    child = _ALLOWED.get(plan)
    if child is None:
        child = _ALLOWED[plan] = DECISIONS.labels("all", "allowed", plan_label(plan))
    count(child)


def refused(layer: str, plan: str = "") -> None:
    """One refusal by ``layer`` under ``plan``, buffered."""
    child = _REFUSED.get((layer, plan))
    if child is None:
        child = _REFUSED[(layer, plan)] = DECISIONS.labels(layer, "refused", plan_label(plan))
    count(child)


def store_outcome(outcome: str, plan: str = "") -> None:
    """A decision the store did not make (unavailable, or the fail policy's), at once."""
    DECISIONS.labels("store", outcome, plan_label(plan)).inc()


def budgets(plans: Any) -> None:
    """Publish every plan's dollar budgets (``plans``: name -> Plan) for the burn-rate alert."""
    for name, plan in plans.items():
        if plan.budget_usd_per_day:
            PLAN_BUDGET_USD.labels(name, "day").set(plan.budget_usd_per_day)
        if plan.budget_usd_per_month:
            PLAN_BUDGET_USD.labels(name, "month").set(plan.budget_usd_per_month)


def time_decision(started: float) -> None:
    """Time one decision in SAMPLE_EVERY into DECISION_SECONDS."""
    global _sampled
    _sampled += 1
    if _sampled % SAMPLE_EVERY == 0:
        DECISION_SECONDS.observe(time.perf_counter() - started)


def flush() -> None:
    """Write every buffered count to the shared files now."""
    global _flushed_at
    with _lock:
        _flushed_at = time.monotonic()
        pending = list(_pending.items())
        _pending.clear()
    for child, amount in pending:
        child.inc(amount)


_flusher = Flusher("metrics-flush", FLUSH_SECONDS, flush)

atexit.register(flush)


def _registry() -> Any:
    """Every worker's counts when in multiprocess mode, else this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY


def refusals() -> dict[str, dict[str, int]]:
    """Refusals since the counters started, for the usage page: ``layer`` (by the refusing
    layer, summed over every worker), ``model`` (by each model's upstream guard) and
    ``shadow`` (what a shadow layer would have refused)."""
    flush()
    out: dict[str, dict[str, int]] = {"layer": {}, "model": {}, "shadow": {}}
    for metric in _registry().collect():
        for sample in metric.samples:
            if not sample.name.endswith("_total") or not sample.value:
                continue
            labels, n = sample.labels, int(sample.value)
            if sample.name == "llm_limiter_decisions_total" and labels.get("outcome") == "refused":
                out["layer"][labels["layer"]] = out["layer"].get(labels["layer"], 0) + n
            elif sample.name == "llm_limiter_upstream_guard_refusals_total":
                out["model"][labels["model"]] = out["model"].get(labels["model"], 0) + n
            elif sample.name == "llm_limiter_would_refuse_total":
                out["shadow"][labels["layer"]] = out["shadow"].get(labels["layer"], 0) + n
    return out


def render() -> tuple[bytes, str]:
    """The exposition text, summed over every worker when in multiprocess mode."""
    flush()
    return generate_latest(_registry()), CONTENT_TYPE_LATEST

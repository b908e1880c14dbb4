"""Prometheus metrics that add up across gunicorn workers (prometheus-client multiprocess mode).

With PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets and empties it at start), every
worker writes its counts to files there and /metrics sums them; without it, one process.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

DECISIONS = Counter("llm_limiter_decisions_total",
                    "Limiter decisions by layer (the refusing one, or 'all') and outcome.",
                    ["layer", "outcome"])
DECISION_SECONDS = Histogram("llm_limiter_decision_seconds",
                             "Time for one whole decision (the script call and its parsing).",
                             buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                                      0.1, 0.25, 1.0))
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
GUARD_REFUSALS = Counter("llm_limiter_upstream_guard_refusals_total",
                         "Requests held back by a model's upstream guard.", ["model"])
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
FAIL_POLICY = Counter("llm_limiter_fail_policy_total",
                      "Decisions made without the store: fail_open, fail_closed or fallback.",
                      ["outcome"])

# Children bound once: a labels() lookup on every request is work the hot path need not do.
ALLOWED = DECISIONS.labels("all", "allowed")
INPUT_TOKENS = TOKENS_SETTLED.labels("input")
CACHED_TOKENS = TOKENS_SETTLED.labels("cached_input")
OUTPUT_TOKENS = TOKENS_SETTLED.labels("output")


def render() -> tuple[bytes, str]:
    """The exposition text, summed over every worker when in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

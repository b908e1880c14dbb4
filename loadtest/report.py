"""The final summary table on stdout and the per-second CSV."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from loadtest.classify import ADMITTED, SKIPPED, kind
from loadtest.driver import LoadPlan, Recorder

_ORDER = {"admitted": 0, "refused": 1, "unavailable": 2, "error": 3, "skipped": 4}


def ordered_labels(recorder: Recorder) -> list[str]:
    """Every label seen: admitted, then refusals, 503 codes, errors and skips, each sorted."""
    return sorted(recorder.totals, key=lambda label: (
        _ORDER[kind(recorder.statuses.get(label, 0), label)], label))


def sent_total(recorder: Recorder) -> int:
    return sum(n for label, n in recorder.totals.items() if label != SKIPPED)


def summary(plan: LoadPlan, recorder: Recorder, elapsed: float, interrupted: bool) -> str:
    """A plain-text table: each outcome with its count and share, then rate and latency."""
    sent = sent_total(recorder)
    rows: list[tuple[str, str, str]] = []
    for label in ordered_labels(recorder):
        group = kind(recorder.statuses.get(label, 0), label)
        name = {"refused": f"refused (429) {label}", "unavailable": f"refused (503) {label}",
                "skipped": "skipped (client busy)"}.get(group, label)
        count = recorder.totals[label]
        share = f"{100 * count / sent:.1f}%" if sent and label != SKIPPED else ""
        rows.append((name, str(count), share))
    rows.append(("sent", str(sent), ""))
    rate = sent / elapsed if elapsed > 0 else 0.0
    rows.append(("achieved rate", f"{rate:.1f}/s", f"target {plan.rate:g}/s"))
    if recorder.latencies:
        ordered = sorted(recorder.latencies)
        p50 = ordered[len(ordered) // 2] * 1000
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000
        rows.append(("latency p50 / p95", f"{p50:.0f} ms", f"{p95:.0f} ms"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'outcome':<{width}}  {'count':>8}  {'':>14}", "-" * (width + 26)]
    lines += [f"{a:<{width}}  {b:>8}  {c:>14}" for a, b, c in rows]
    head = f"load test: {elapsed:.1f}s" + (" (interrupted)" if interrupted else "")
    return "\n".join([head, *lines])


def write_csv(path: Path, recorder: Recorder) -> None:
    """One row per second since the start: sent, then a column per outcome label."""
    labels = ordered_labels(recorder)
    if ADMITTED not in labels:
        labels.insert(0, ADMITTED)
    last = max(recorder.per_second, default=-1)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["second", "sent", *labels])
        for second in range(last + 1):
            counts = recorder.per_second.get(second) or Counter()
            sent = sum(n for label, n in counts.items() if label != SKIPPED)
            out.writerow([second, sent, *(counts.get(label, 0) for label in labels)])

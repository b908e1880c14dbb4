"""Collecting per-round results and rendering the markdown tables."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import WrkResult
from bench.streaming import StreamRow


@dataclass
class Row:
    """All measurements of one contender (one per round) or why it failed."""

    name: str
    worker_class: str
    connections: int = 0
    runs: list[WrkResult] = field(default_factory=list)
    round_ids: list[int] = field(default_factory=list)  # round of each run, same order
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.runs)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    def total(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.runs)

    def add(self, result: WrkResult, round_id: int = 1) -> None:
        self.runs.append(result)
        self.round_ids.append(round_id)

    def ratios_to(self, base: Row) -> list[float]:
        """2xx/s over base's 2xx/s for each round both ran: noise hitting a round cancels."""
        base_by_round = dict(zip(base.round_ids, base.runs, strict=True))
        return [
            run.ok_rps / base_by_round[rid].ok_rps
            for rid, run in zip(self.round_ids, self.runs, strict=True)
            if rid in base_by_round and base_by_round[rid].ok_rps > 0
        ]


def worker_label(row: Row | StreamRow) -> str:
    """The requested worker class, and what gunicorn actually ran if that differs."""
    ran = next((r.server_worker for r in row.runs if r.server_worker), None)
    if ran is None or ran in row.worker_class:
        return row.worker_class
    return f"{row.worker_class}, ran {ran}!"


def _lat(row: Row, attr: str, digits: int) -> str:
    """Median latency over the rounds that completed any request ("-" if none did)."""
    values = [getattr(r, attr) for r in row.runs if r.requests]
    return f"{statistics.median(values):.{digits}f}" if values else "-"


def _fmt_rps(x: float) -> str:
    return f"{x:,.0f}"


def _failed(row: Row | StreamRow, ncols: int) -> str:
    reason = (row.failure or "no result").splitlines()[0][:160].replace("|", "/")
    return f"| {row.name} | {row.worker_class} | failed: {reason} |" + " |" * (ncols - 3)


def fast_table(rows: list[Row], baseline: str = "none") -> list[str]:
    head = [
        "| contender | worker class | req/s (median) | vs none | p50 ms | p99 ms | non-2xx | 429 "
        "| socket errors | rounds req/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = next((r for r in rows if r.name == baseline and r.ok), None)
    lines = list(head)
    for row in rows:
        if not row.ok:
            lines.append(_failed(row, 10))
            continue
        rps = row.median("rps")
        ratios = row.ratios_to(base) if base else []
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "n/a"
        flag = " ⚠" if row.total("count_429") else ""
        rounds = ", ".join(_fmt_rps(r.rps) for r in row.runs)
        lines.append(
            f"| {row.name}{flag} | {worker_label(row)} | {_fmt_rps(rps)} | {ratio} "
            f"| {_lat(row, 'p50_ms', 1)} | {_lat(row, 'p99_ms', 1)} "
            f"| {row.total('non_2xx')} | {row.total('count_429')} "
            f"| {row.total('socket_errors') + row.total('timeouts')} | {rounds} |"
        )
    return lines


def slow_table(rows: list[Row], reference: str) -> list[str]:
    lines = [
        "| connections | contender | worker class | req/s | 2xx/s | ours / fastapi | p50 ms "
        "| p99 ms | socket errors (connect/read/write) | timeouts | non-2xx | 429 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for conns in sorted({r.connections for r in rows}):
        group = [r for r in rows if r.connections == conns]
        ref = next((r for r in group if r.name == reference and r.ok), None)
        for row in group:
            if not row.ok:
                reason = (row.failure or "no result").splitlines()[0][:160].replace("|", "/")
                lines.append(
                    f"| {conns} | {row.name} | {row.worker_class} | failed: {reason} |" + " |" * 8
                )
                continue
            rps = row.median("rps")
            ratios = row.ratios_to(ref) if ref is not None else []
            ratio = f"{statistics.median(ratios):.2f}x" if ratios else "n/a"
            flag = " ⚠" if row.total("count_429") else ""
            lines.append(
                f"| {conns} | {row.name}{flag} | {worker_label(row)} | {_fmt_rps(rps)} "
                f"| {_fmt_rps(row.median('ok_rps'))} | {ratio} "
                f"| {_lat(row, 'p50_ms', 0)} | {_lat(row, 'p99_ms', 0)} "
                f"| {row.total('connect_errors')}/{row.total('read_errors')}"
                f"/{row.total('write_errors')} "
                f"| {row.total('timeouts')} "
                f"| {row.total('non_2xx')} | {row.total('count_429')} |"
            )
    return lines


def flags(rows: list[Row]) -> list[str]:
    out = []
    for row in rows:
        if row.ok and row.failure:
            where = f" at {row.connections} connections" if row.connections else ""
            first = row.failure.splitlines()[0][:200]
            out.append(f"- **{row.name}** ({row.worker_class}){where} failed in a round: {first}")
        if row.ok and row.total("count_429"):
            where = f" at {row.connections} connections" if row.connections else ""
            n429 = row.total("count_429")
            out.append(
                f"- ⚠ **{row.name}** ({row.worker_class}){where} got {n429} x 429: "
                "it refused load the bench meant to admit, so its req/s is not the admitted path."
            )
        other = row.total("non_2xx") - row.total("count_429") if row.ok else 0
        if other:
            codes: dict[int, int] = {}
            bodies: dict[int, str] = {}
            for run in row.runs:
                for code, n in run.statuses.items():
                    if not 200 <= code < 300 and code != 429:
                        codes[code] = codes.get(code, 0) + n
                        bodies.setdefault(code, run.samples.get(code, ""))
            where = f" at {row.connections} connections" if row.connections else ""
            seen = "; ".join(f"{code}: `{' '.join(b.split())[:160]}`" for code, b in bodies.items())
            out.append(
                f"- **{row.name}** ({row.worker_class}){where}, non-2xx other than 429: {codes}"
                + (f" — e.g. {seen}" if seen else "")
            )
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x" if values else "n/a"


def stream_table(rows: list[StreamRow], baseline: str = "none") -> list[str]:
    lines = [
        "| contender | worker class | calls | completed | failed | TTFB p50 ms | TTFB p99 ms "
        "| total p50 ms | total p99 ms | TTFB p50 / none | TTFB p99 / none "
        "| server CPU ms/call | rounds TTFB p50 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = next((r for r in rows if r.name == baseline and r.ok), None)
    for row in rows:
        if not row.ok:
            lines.append(_failed(row, 13))
            continue
        p50 = row.ratios_to(base, "ttfb_ms", 50) if base else []
        p99 = row.ratios_to(base, "ttfb_ms", 99) if base else []
        rounds = ", ".join(_ms(r.pct("ttfb_ms", 50)) for r in row.runs)
        cpu = row.median_cpu()
        lines.append(
            f"| {row.name} | {worker_label(row)} | {row.runs[0].n:,} "
            f"| {statistics.median(r.completed for r in row.runs):,.0f} "
            f"| {statistics.median(r.failed for r in row.runs):,.0f} "
            f"| {_ms(row.median('ttfb_ms', 50))} | {_ms(row.median('ttfb_ms', 99))} "
            f"| {_ms(row.median('total_ms', 50))} | {_ms(row.median('total_ms', 99))} "
            f"| {_ratio(p50)} | {_ratio(p99)} | {'-' if cpu is None else f'{cpu:.1f}'} "
            f"| {rounds} |"
        )
    return lines


def stream_added_ttfb(rows: list[StreamRow], ours: str = "ours", baseline: str = "none") -> str:
    """The headline: the limiter's added time-to-first-byte, as a ratio to no limiter."""
    mine = next((r for r in rows if r.name == ours and r.ok), None)
    base = next((r for r in rows if r.name == baseline and r.ok), None)
    if mine is None or base is None:
        return "The limiter's added time-to-first-byte: n/a (a contender has no result)."
    p50 = _ratio(mine.ratios_to(base, "ttfb_ms", 50))
    p99 = _ratio(mine.ratios_to(base, "ttfb_ms", 99))
    cpu = _ratio(mine.cpu_ratios_to(base))
    return (
        f"**The limiter's added time-to-first-byte**: ours / none = **{p50}** at p50, "
        f"**{p99}** at p99 (median over rounds of the same-round ratio). Server CPU per call, "
        f"ours / none: {cpu} — with 1,000 calls at once the workers are CPU-bound, so TTFB "
        "mostly tracks it."
    )


def stream_flags(rows: list[StreamRow]) -> list[str]:
    out = []
    for row in rows:
        if row.ok and row.failure:
            first = row.failure.splitlines()[0][:200]
            out.append(f"- **{row.name}** ({row.worker_class}) failed in a round: {first}")
        for rid, run in zip(row.round_ids, row.runs, strict=True):
            if not run.failed:
                continue
            kinds = []
            for kind, n in run.errors.items():
                sample = " ".join(run.samples.get(kind, "").split())[:160]
                kinds.append(f"{kind} x{n}" + (f" (e.g. `{sample}`)" if sample else ""))
            out.append(
                f"- **{row.name}** round {rid}: {run.failed} of {run.n} calls failed: "
                + "; ".join(kinds)
            )
    return out


def publish(text: str, failed: Sequence[str], results: Path, elsewhere: Path,
            draw: Callable[[], None]) -> int:
    """The exit status of a run, writing ``results`` (and ``draw``-ing its chart) only when no
    contender ``failed``: a failed run's numbers are not results, so its report goes to
    ``elsewhere`` and the last good file stays as it was."""
    if failed:
        elsewhere.write_text(text)
        print(f"failed: {', '.join(failed)}; {results.name} left as it was, this run's report "
              f"is {elsewhere}", file=sys.stderr)
        return 1
    results.write_text(text)
    draw()
    return 0

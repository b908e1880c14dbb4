"""The abuse section of ``python -m bench``: refusing must be cheaper than serving.

(a) one user over its limit hammering /chat (a plan of burst 1 that refills once in 1,000 s:
nearly every request is a 429); (b) one IP rotating user ids against the edge (3 requests an
hour per address; every request names a new user id); (c) as (a), but the user is an API
key's (REQUIRE_API_KEY=1: each request presents the key, which is otherwise looked up in the
store). Each against the bare echo app's 200/s
in the same round, and the store calls per refusal: Valkey's INFO commandstats (EVALSHA, and
every command) read before and after the measured run, divided by the refusals. The user case
also runs with the deny cache off (DENY_CACHE=0): what each refusal cost before it.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.contenders import Contender
from bench.loadgen import WrkFailed, WrkResult, run_wrk
from bench.procs import NotReady, free_port, wait_ready
from bench.sections import Settings, describe, say
from bench.store import flushall


def _policy(note: str, per_ip: str, burst: int, refill: float) -> str:
    return (f"# bench abuse {note}\n[edge]\nper_ip = [{per_ip!r}]\n\n[defaults]\nplan = \"abuse\"\n"
            f"\n[plans.abuse]\nburst = {burst}\nrefill_per_second = {refill}\n"
            f"quotas = [\"100000000 per day\"]\n").replace("'", '"')


# (a) one user over its limit; the edge never refuses.
USER_POLICY = _policy("(a): one user over its limit", "100000000 per minute", 1, 0.001)
# (b) one IP rotating user ids: users are roomy; the edge holds the address.
EDGE_POLICY = _policy("(b): one IP rotating user ids", "3 per hour", 1000000, 100000)


@dataclass(frozen=True)
class Case:
    name: str
    contender: Contender
    users: int
    policy: str = ""           # ours: the policy text
    env: tuple[tuple[str, str], ...] = ()
    keyed: bool = False        # every request presents an API key made for the run


@dataclass
class AbuseRow:
    name: str
    runs: list[WrkResult] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)   # refusals/s / none's 200/s, same round
    evalsha: list[float] = field(default_factory=list)   # per refusal
    commands: list[float] = field(default_factory=list)  # per refusal
    failure: str | None = None


def _commands(url: str) -> tuple[int, int]:
    """(EVALSHA calls, all calls but INFO) so far."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    evalsha = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    total = sum(int(v.get("calls", 0)) for k, v in stats.items() if k != "cmdstat_info")
    return evalsha, total


def _measure(case: Case, s: Settings, wrk: str, redis_url: str, logdir: Path
             ) -> tuple[WrkResult, int, int]:
    """One run: (wrk's result, EVALSHA calls, store commands) during the measured part."""
    flushall(redis_url)
    port = free_port()
    env = dict(case.env)
    if case.policy:
        path = logdir / f"abuse-{case.name.split()[0].strip('()')}.toml"
        path.write_text(case.policy)
        env["LIMITS_CONFIG"] = str(path)
    managed = case.contender.process(port, redis_url, s.workers, logdir, extra_env=env)
    try:
        key = _make_key(managed.env) if case.keyed else ""
        managed.start()
        if key:   # the key's user pays: no user_id (another would be a 403)
            wait_ready(managed, port, {"message": "ready?"}, {"Authorization": f"Bearer {key}"})
        else:
            wait_ready(managed, port, {"message": "ready?", "user_id": "bench-ready"})
        common = dict(threads=s.threads, timeout_s=5, users=case.users, key=key)
        if s.warmup > 0:
            run_wrk(wrk, port, connections=s.connections, duration_s=s.warmup, **common)
        time.sleep(0.2)
        evalsha, total = _commands(redis_url)
        result = run_wrk(wrk, port, connections=s.connections, duration_s=s.duration, **common)
        evalsha_after, total_after = _commands(redis_url)
        return managed.finished(result), evalsha_after - evalsha, total_after - total
    finally:
        managed.stop()


def _make_key(env: dict[str, str]) -> str:
    """An API key for the run, made by the app's own CLI on the run's store."""
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "keys", "create",
                           "bench-keyed"], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


def abuse_section(s: Settings, wrk: str, redis_url: str, logdir: Path) -> list[str]:
    none = Contender("none", "baseline", "bench.apps.nolimit:app", s.worker_class)
    ours = Contender("ours", "ours", worker_class=s.worker_class)
    cases = [
        Case("none (200s)", none, 1),
        Case("(a) one user over its limit", ours, 1, USER_POLICY),
        Case("(a) same, deny cache off", ours, 1, USER_POLICY, (("DENY_CACHE", "0"),)),
        Case("(b) one IP rotating user ids", ours, 10**9, EDGE_POLICY),
        Case("(c) one API key over its limit", ours, 1, USER_POLICY,
             (("REQUIRE_API_KEY", "1"),), keyed=True),
    ]
    rows = {c.name: AbuseRow(c.name) for c in cases}
    for rnd in range(1, s.rounds + 1):
        base: float | None = None
        for case in cases:
            row = rows[case.name]
            tag = f"[abuse {rnd}/{s.rounds}] {case.name}"
            try:
                res, evalsha, total = _measure(case, s, wrk, redis_url, logdir)
            except (NotReady, WrkFailed) as exc:
                row.failure = str(exc)
                say(f"{tag}: failed: {exc}")
                continue
            row.runs.append(res)
            refused = res.count_429
            if case.contender is none:
                base = res.ok_rps
            elif refused:
                if base:
                    row.ratios.append(refused / res.duration_s / base)
                row.evalsha.append(evalsha / refused)
                row.commands.append(total / refused)
            say(f"{tag}: {describe(res)}; 429 {refused}, EVALSHA {evalsha}, commands {total}")
    return _table(s, list(rows.values()))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _table(s: Settings, rows: list[AbuseRow]) -> list[str]:
    lines = [
        f"## Abuse: refusing vs serving ({s.workers} workers, {s.worker_class}, "
        f"wrk -t{s.threads} -c{s.connections}, {s.duration:g} s after {s.warmup:g} s warm-up, "
        f"{s.rounds} interleaved round(s))",
        "",
        "| case | 200/s | 429/s | vs none's 200/s | EVALSHA per 429 | store commands per 429 "
        "| p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row.runs:
            lines.append(f"| {row.name} | failed: {(row.failure or '?').splitlines()[0]} "
                         "| | | | | | |")
            continue
        ok = statistics.median(r.ok_rps for r in row.runs)
        refused = statistics.median(r.count_429 / r.duration_s for r in row.runs)
        ratio, per, cmds = _median(row.ratios), _median(row.evalsha), _median(row.commands)
        lines.append(
            f"| {row.name} | {ok:,.0f} | {refused:,.0f} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | "
            f"{'' if per is None else f'{per:.4f}'} | {'' if cmds is None else f'{cmds:.4f}'} | "
            f"{statistics.median(r.p50_ms for r in row.runs):.1f} | "
            f"{statistics.median(r.p99_ms for r in row.runs):.1f} |")
    lines += [
        "",
        "vs none: median over rounds of 429/s / none's 200/s in the same round (goal >= 1.0x). "
        "Per 429: calls Valkey counted (INFO commandstats) during the measured run / 429s "
        "(goal <= 0.05 EVALSHA); commands count every call Valkey ran, the script's own inner "
        "calls (TIME, GET, INCRBY, PTTL) and the workers' once-a-second overrides check included. "
        "(a): policy burst 1, refill 0.001/s, one user_id; (b): edge 3 per hour, a new user_id "
        "every request; (c): as (a), an API key's user (the key presented on every request).",
    ]
    return lines

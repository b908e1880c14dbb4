"""Micro-measurements against the bench's Valkey, called by ``python -m bench``.

``ping_loop`` is the yardstick: n sequential PINGs from one redis-py client.
``decisions_loop`` times n sequential limiter decisions for distinct users through the
project's engine (edge + bucket + quota, one script call each), ``llm_loop`` n full LLM
decisions (edge + bucket + quota + tokens + dollars + lease + the model's guard, one call
each), and ``bytes_per_user`` the Redis memory per active user after such decisions.
"""

from __future__ import annotations

import statistics
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import redis


def ping_loop(url: str, n: int) -> float:
    """Seconds taken by n sequential PINGs over one connection (after one untimed PING)."""
    client = redis.Redis.from_url(url)
    try:
        client.ping()
        start = time.perf_counter()
        for _ in range(n):
            client.ping()
        return time.perf_counter() - start
    finally:
        client.close()


# The full LLM decision's policy (its budget needs every model priced, which the bench's
# limits.bench.toml keeps out of the other sections): limits never reached.
LLM_POLICY = """
[edge]
per_ip = ["1000000 per minute"]

[plans.bench-llm]
burst = 1000000
refill_per_second = 100000
quotas = ["100000000 per day"]
tokens_per_minute = 100000000000
budget_usd_per_day = 1000000.0
max_concurrent = 100000

[models."gpt-bench"]
provider = "openai"
requests_per_minute = 100000000
tokens_per_minute = 100000000000
input_usd_per_million = 0.15
output_usd_per_million = 0.6
"""


def _engine(url: str, text: str | None = None):  # type: ignore[no-untyped-def]
    from limiting.core.policy import load_policy, parse_policy
    from limiting.engine import EdgeKeys, Engine
    from limiting.stores.storage import open_store

    if text is None:
        policy = load_policy(Path(__file__).with_name("limits.bench.toml"))
    else:
        policy = parse_policy(tomllib.loads(text), "bench/decisions.py")
    keys = EdgeKeys(policy.edge_per_ip)
    # A loaded box's budget (2 s): the loop measures time, a timeout would only end it.
    return Engine(open_store(url, timeout=2), policy, edge=keys.layers(policy.fail_edge),
                  edge_keys=keys)


def decisions_loop(url: str, n: int) -> float:
    """Seconds for n sequential whole decisions (edge + user bucket + one quota), one per
    request, through the project's engine: what one request pays in Redis round trips."""
    engine = _engine(url)
    try:
        engine.acquire("warm-up", "127.0.0.1")
        start = time.perf_counter()
        for i in range(n):
            engine.acquire(f"bench-user-{i % 1000}", "127.0.0.1")
        return time.perf_counter() - start
    finally:
        engine.store.close()


def llm_loop(url: str, n: int) -> float:
    """Seconds for n sequential full LLM decisions through the engine's reserve (one script
    call each: the guard rides in the user's call on one server). Each reservation is then
    cancelled, untimed, as a finished request releases its lease: the leases a user holds
    stay what it has in flight."""
    from limiting.core.ask import Ask

    engine = _engine(url, LLM_POLICY)
    plan = engine.policy.plans["bench-llm"]
    ask = Ask("gpt-bench", engine.policy.models["gpt-bench"], 200, 300)
    clock = time.perf_counter
    try:
        engine.reserve("warm-up", plan, ask, ip="127.0.0.1").cancel()
        spent = 0.0
        for i in range(n):
            start = clock()
            held = engine.reserve(f"bench-llm-{i % 1000}", plan, ask, ip="127.0.0.1")
            spent += clock() - start
            held.cancel()
        return spent
    finally:
        engine.store.close()


def _captured(engine, calls: list[tuple[list[str], list[bytes]]]) -> None:  # type: ignore[no-untyped-def]
    """Record every acquire call ``engine`` makes (keys, args), for a bare replay."""
    real = engine.store.acquire

    def acquire(keys: list[str], args: list[bytes]) -> list[int]:
        calls.append((keys, list(args)))
        return real(keys, args)  # type: ignore[no-any-return]

    engine.store.acquire = acquire


def breakdown(url: str, n: int, flushall: Callable[[str], None]) -> list[str]:
    """Where a decision's time goes, in one run: the PING round trip, Valkey's own time per
    call (INFO commandstats usec_per_call), the same acquire.lua calls replayed bare through
    redis-py (no engine), and the engine's. Engine minus bare is the project's Python; bare
    minus Valkey's time is the round trip and redis-py."""
    from limiting.core.ask import Ask
    from limiting.stores.scripts import script_source

    client = redis.Redis.from_url(url)
    out = []
    try:
        for name, text in (("edge + bucket + quota", None), ("full LLM decision", LLM_POLICY)):
            flushall(url)
            engine = _engine(url, text)
            calls: list[tuple[list[str], list[bytes]]] = []
            _captured(engine, calls)
            held = []
            client.config_resetstat()
            start = time.perf_counter()
            if text is None:
                for i in range(n):
                    engine.acquire(f"bench-user-{i % 1000}", "127.0.0.1")
            else:
                plan = engine.policy.plans["bench-llm"]
                ask = Ask("gpt-bench", engine.policy.models["gpt-bench"], 200, 300)
                for i in range(n):
                    held.append(engine.reserve(f"bench-llm-{i % 1000}", plan, ask,
                                               ip="127.0.0.1", renews=False))
            engine_s = (time.perf_counter() - start) / n
            inside = client.info("commandstats").get("cmdstat_evalsha", {})
            for reservation in held:
                reservation.cancel()
            engine.store.close()
            flushall(url)
            script = client.register_script(script_source("acquire"))
            script(*calls[0])
            start = time.perf_counter()
            for keys, args in calls:
                script(keys, args)
            bare_s = (time.perf_counter() - start) / len(calls)
            # The floor of any one-call design: a script that does nothing, sent the same keys
            # and arguments (redis-py encodes them, Valkey parses them and starts Lua).
            empty = client.register_script("return 1")
            empty(*calls[0])
            client.config_resetstat()
            start = time.perf_counter()
            for keys, args in calls:
                empty(keys, args)
            floor_s = (time.perf_counter() - start) / len(calls)
            floor_in = client.info("commandstats").get("cmdstat_evalsha", {})
            client.config_resetstat()
            ping_s = ping_loop(url, n) / n
            ping_in = client.info("commandstats").get("cmdstat_ping", {})
            out.append(
                f"- {name}: engine {engine_s * 1e6:.1f} µs = {engine_s / ping_s:.2f}x a PING "
                f"({ping_s * 1e6:.1f} µs, {ping_in.get('usec_per_call', 0):.1f} µs in Valkey); "
                f"the same {len(calls) / n:.1f} EVALSHA per decision bare through redis-py: "
                f"{bare_s * 1e6:.1f} µs = {bare_s / ping_s:.2f}x; inside Valkey per EVALSHA: "
                f"{inside.get('usec_per_call', 0):.1f} µs; an empty script sent the same keys "
                f"and arguments (the floor of one call): {floor_s * 1e6:.1f} µs = "
                f"{floor_s / ping_s:.2f}x, {floor_in.get('usec_per_call', 0):.1f} µs inside")
    finally:
        client.close()
    return out


def bytes_per_user(url: str) -> float:
    """Redis memory per active user (bucket + quota keys, MEMORY USAGE) after 2,000 users
    made 20 requests each — independent of how many requests a user makes."""
    engine = _engine(url)
    client = redis.Redis.from_url(url)
    try:
        for i in range(2000):
            for _ in range(20):
                engine.acquire(f"bytes-user-{i}", "127.0.0.1")
        total = 0
        for key in client.scan_iter(match="rl:{u:bytes-user-*", count=1000):
            total += client.memory_usage(key, samples=0) or 0
        return total / 2000
    finally:
        client.close()
        engine.store.close()


def section(url: str, n: int, flushall: Callable[[str], None], rounds: int = 3) -> list[str]:
    """The decisions section's report lines: each decision's time over a PING round trip's,
    medians of ``rounds`` interleaved rounds of n calls each in this one run (ratios, not
    absolute times, are what a shared machine can compare), then Redis memory per user."""
    from bench import memory
    from bench.floors import floors

    times: dict[str, list[float]] = {"ping": [], "decision": [], "llm": []}
    for _ in range(rounds):
        flushall(url)
        times["ping"].append(ping_loop(url, n) / n)
        flushall(url)
        times["decision"].append(decisions_loop(url, n) / n)
        flushall(url)
        times["llm"].append(llm_loop(url, n) / n)
    ping = statistics.median(times["ping"])
    lines = [f"- PING round trip: {ping * 1e6:.1f} µs (n={n}, {rounds} rounds, sequential, "
             "one redis-py client)"]
    for name, what in (("decision", "edge + bucket + quota"),
                       ("llm", "full LLM decision: edge + bucket + quota + tokens + dollars "
                               "+ lease + the model's guard")):
        ratios = [t / p for t, p in zip(times[name], times["ping"], strict=True)]
        lines.append(f"- {what}, one call: {statistics.median(times[name]) * 1e6:.1f} µs "
                     f"= {statistics.median(ratios):.2f}x a PING (rounds: "
                     f"{', '.join(f'{r:.2f}' for r in ratios)})")
    lines += breakdown(url, n, flushall)
    flushall(url)
    lines += floors(url, n)
    flushall(url)
    lines.append(f"- Redis bytes per active user (bucket + quota, MEMORY USAGE, bench plan): "
                 f"{bytes_per_user(url):,.0f}")
    flushall(url)
    lines += memory.layer_bytes(url)
    flushall(url)
    lines.append("- used_memory per active user through /chat, default policy (one request "
                 f"each, 2,000 users): {memory.chat_bytes_per_user(url):,.0f} bytes")
    return lines

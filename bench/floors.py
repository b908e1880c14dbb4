"""The least any one-call design can cost, against a PING: what the decisions section's ratio
could reach if the decision itself were free.

Each candidate is one round trip that a decision could be made of: a script or a Valkey
Function that does nothing; ones that only read and write one key (all of a user's layers in
one key: the least state a user's decision reads and writes) or two (the model's guard, shared
by every user, in the other); and an empty script sent the full LLM decision's 9 keys and 36
arguments. The calls are interleaved one by one with PINGs on one connection, so the machine's
drift falls on all of them alike, and each is reported as its median over the PING's median.

``python -m bench.floors [--n 5000]`` prints the lines alone; the decisions section includes
them.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import redis

_LIBRARY = """#!lua name=benchfloor
redis.register_function('bench_empty', function(keys, args) return 1 end)
redis.register_function('bench_rw', function(keys, args)
  for i = 1, #keys do redis.call('GET', keys[i]) end
  for i = 1, #keys do redis.call('SET', keys[i], args[i]) end
  return 1
end)
"""
_RW = ("for i = 1, #KEYS do redis.call('GET', KEYS[i]) end "
       "for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i]) end return 1")


def candidates(client: redis.Redis) -> dict[str, Callable[[], object]]:
    """Each floor's one call, sent as the engine sends its own (a bare command, no Script
    wrapper), by name."""
    client.function_load(_LIBRARY, replace=True)
    empty = client.script_load("return 1")
    rw = client.script_load(_RW)
    state = ["{bench-floor}:user", "{bench-floor}:guard"]
    blobs = ["u" * 200, "g" * 100]   # about a user's LLM layers and a guard, encoded
    keys9 = [f"{{bench-floor}}:k{i}" for i in range(9)]
    args36 = ["w", "100000000", "86400000000", "1"] * 9
    run = client.execute_command
    return {
        "PING": lambda: run("PING"),
        "a Function that does nothing, no keys or arguments": lambda: run(
            "FCALL", "bench_empty", 0),
        "a script that does nothing, no keys or arguments": lambda: run("EVALSHA", empty, 0),
        "a Function that reads and writes 1 key (GET, SET), nothing decided": lambda: run(
            "FCALL", "bench_rw", 1, state[0], blobs[0]),
        "a Function that reads and writes 2 keys (GET, GET, SET, SET), nothing decided":
            lambda: run("FCALL", "bench_rw", 2, *state, *blobs),
        "a script that reads and writes 2 keys, nothing decided": lambda: run(
            "EVALSHA", rw, 2, *state, *blobs),
        "a script that does nothing, sent the full LLM decision's 9 keys and 36 arguments":
            lambda: run("EVALSHA", empty, 9, *keys9, *args36),
    }


def floors(url: str, n: int) -> list[str]:
    """Report lines: each candidate's median round trip over the PING's, n interleaved calls."""
    client = redis.Redis.from_url(url)
    try:
        calls = candidates(client)
        for call in calls.values():
            call()
        took: dict[str, list[int]] = {name: [] for name in calls}
        clock = time.perf_counter_ns
        order = list(calls.items())
        for _ in range(n):
            for name, call in order:
                start = clock()
                call()
                took[name].append(clock() - start)
    finally:
        with contextlib.suppress(redis.RedisError):   # the store's own keys stay as they were
            client.function_delete("benchfloor")
            client.delete("{bench-floor}:user", "{bench-floor}:guard")
        client.close()
    ping = statistics.median(took.pop("PING"))
    lines = [f"- The floors of one call, interleaved call by call with PINGs (n={n}; PING "
             f"{ping / 1000:.1f} µs):"]
    for name, times in took.items():
        median = statistics.median(times)
        lines.append(f"  - {name}: {median / ping:.2f}x a PING")
    return lines


def main() -> None:
    from bench.store import valkey

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    opts = parser.parse_args()
    with valkey() as url:
        print("\n".join(floors(url, opts.n)))


if __name__ == "__main__":
    main()

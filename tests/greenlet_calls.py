"""Run limiter decisions as gevent greenlets in a patched process; print what happened as JSON.

python tests/greenlet_calls.py URL SCENARIO N — the test process itself is not patched, so
tests/test_pipelining.py runs this in a subprocess, as a gevent worker would run requests.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from limiting import metrics  # noqa: E402
from limiting.core.policy import parse_policy  # noqa: E402
from limiting.engine import Engine  # noqa: E402
from limiting.stores.storage import open_store  # noqa: E402


def main(url: str, scenario: str, n: int) -> dict[str, object]:
    policy = parse_policy({"store": {"timeout_ms": 2000 if scenario != "silent" else 50},
                           "plans": {"p": {"burst": 100, "refill_per_second": 0.001,
                                           "quotas": ["1000 per day"]}}})
    store = open_store(url, timeout=policy.timeout_ms / 1000)
    engine = Engine(store, policy)
    if scenario == "flush":
        redis.Redis.from_url(url).script_flush()
    users = ["hot"] * n if scenario in ("exact", "silent") else [f"u{i}" for i in range(n)]
    started = time.monotonic()
    jobs = [gevent.spawn(engine.acquire, user) for user in users]
    gevent.joinall(jobs, timeout=30)
    decisions = [job.value for job in jobs]
    metrics.flush()   # the hot path's counts are buffered for up to a second
    return {
        "done": sum(job.ready() for job in jobs),
        "errors": [repr(job.exception) for job in jobs if job.exception is not None],
        "allowed": sum(1 for d in decisions if d is not None and d.allowed),
        "unavailable": sum(1 for d in decisions if d is not None and d.unavailable),
        "seconds": time.monotonic() - started,
        "round_trips": metrics.STORE_ROUND_TRIPS._value.get(),
        "calls": metrics.STORE_SCRIPT_CALLS._value.get(),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))

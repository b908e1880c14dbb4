"""Redis memory per user, two ways, called by ``python -m bench`` (decisions section).

``layer_bytes``: ``MEMORY USAGE`` of each layer's key after a few decisions: the default
policy's bucket + "100 per day" window, and every layer of an LLM plan (bucket, quotas,
tokens, dollars, lease). ``chat_bytes_per_user``: the server's ``used_memory`` grown per
active user through ``/chat`` with the default policy (keys, expiry entries, allocator
rounding: what a deploy pays).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import redis

# One user of each plan, with no edge: only the user's own keys are counted.
_PLANS = """
[plans.starter]
burst = 10
refill_per_second = 0.5
quotas = ["100 per day"]

[plans.llm]
burst = 10
refill_per_second = 0.5
quotas = ["100 per day", "3000 per month"]
tokens_per_minute = 200000
budget_usd_per_day = 5.0
max_concurrent = 4

[models."gpt-x"]
provider = "openai"
requests_per_minute = 500
tokens_per_minute = 200000
input_usd_per_million = 2.5
output_usd_per_million = 10
"""


def _usage(client: redis.Redis, pattern: str) -> dict[str, int]:
    """MEMORY USAGE of every key matching ``pattern``, by its key name."""
    return {key.decode(): client.memory_usage(key, samples=0) or 0
            for key in client.scan_iter(match=pattern, count=1000)}


def layer_sizes(url: str) -> dict[str, dict[str, int]]:
    """MEMORY USAGE of each layer's key by plan ("starter": the default policy's bucket and
    "100 per day"; "llm": bucket, quotas, tokens, dollars and a lease held), after a few
    decisions."""
    import tomllib

    from limiting.core.ask import Ask
    from limiting.core.policy import parse_policy
    from limiting.engine import Engine
    from limiting.stores.storage import open_store

    policy = parse_policy(tomllib.loads(_PLANS))
    engine = Engine(open_store(url, timeout=2), policy, namespace="mb:")
    client = redis.Redis.from_url(url)
    ask = Ask("gpt-x", policy.models["gpt-x"], 500, 500)
    try:
        for _ in range(3):
            engine.acquire("u-starter", None, policy.plans["starter"])
            engine.reserve("u-llm", policy.plans["llm"], ask, guard=False).cancel()
        held = engine.reserve("u-llm", policy.plans["llm"], ask, guard=False)
        sizes = {plan: {key.rsplit(":", 1)[-1]: n
                        for key, n in _usage(client, f"mb:*u-{plan}*").items()}
                 for plan in ("starter", "llm")}
        held.cancel()
        return sizes
    finally:
        client.close()
        engine.store.close()


def layer_bytes(url: str) -> list[str]:
    """Report lines: bytes by MEMORY USAGE per layer, for the default plan and an LLM plan."""
    lines = []
    for plan, sizes in layer_sizes(url).items():
        parts = ", ".join(f"{layer} {n}" for layer, n in sorted(sizes.items()))
        lines.append(f"- MEMORY USAGE per layer, {plan} plan: {parts} "
                     f"= {sum(sizes.values()):,} bytes")
    return lines


def chat_bytes_per_user(url: str, users: int = 2000) -> float:
    """``used_memory`` grown per active user after each of ``users`` users sent one /chat
    request through the app with the default policy (its edge keyed by one IP)."""
    from app import create_app

    client = redis.Redis.from_url(url)
    try:
        with tempfile.TemporaryDirectory() as folder:
            default = Path(__file__).parents[1] / "limiting" / "default_limits.toml"
            text = default.read_text().replace('"20 per 10 seconds"', '"100000 per second"')
            # A loaded box's budget: a slow moment must not end the count with a 503.
            text += "\n[store]\ntimeout_ms = 2000\n"
            policy = Path(folder) / "limits.toml"
            policy.write_text(text)
            app = create_app({"REDIS_URL": url, "LIMITS_CONFIG": str(policy),
                              "REQUIRE_API_KEY": "0"})
            web = app.test_client()
            web.post("/chat", json={"message": "hi", "user_id": "warm-up"})
            before = int(client.info("memory")["used_memory"])
            for i in range(users):
                got = web.post("/chat", json={"message": "hi", "user_id": f"mem-user-{i}"})
                if got.status_code != 200:
                    raise RuntimeError(f"/chat answered {got.status_code}: {got.get_data()!r}")
            after = int(client.info("memory")["used_memory"])
        return (after - before) / users
    finally:
        client.close()

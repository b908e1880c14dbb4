"""End users behind a key under gunicorn with three workers on a real Valkey: clients racing
through the real openai (``user``, ``safety_identifier``) and anthropic (``metadata.user_id``)
SDKs, plain and streamed, are admitted exactly the end user's quota across workers, another
key's same id is another end user, and the spend ledger lists the holder's end users."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anthropic
import httpx
import openai
import pytest
import redis

from tests.conftest import keyed_app
from tests.policies import loaded_toml

pytestmark = pytest.mark.slow

QUOTA = 4
POLICY = loaded_toml() + f"""
[edge]
per_ip = ["100000 per 10 seconds"]

[plans.p]
burst = 1000
refill_per_second = 0.001
quotas = ["1000 per day"]
end_user = {{ quotas = ["{QUOTA} per day"], tokens_per_minute = 100000 }}

[models."gpt-4o-mini"]
provider = "openai"
input_usd_per_million = 100
output_usd_per_million = 400

[models."claude-3-5-haiku-latest"]
provider = "anthropic"
input_usd_per_million = 100
output_usd_per_million = 400
"""
ADMIN = "admin-" + "x" * 40
HELLO = [{"role": "user", "content": "hello"}]


@dataclass
class Stack:
    url: str
    keys: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    redis.Redis.from_url(redis_url).flushall()
    folder = tmp_path_factory.mktemp("endusers")
    (folder / "limits.toml").write_text(POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(folder / "limits.toml"),
           "ADMIN_TOKEN": ADMIN}
    with keyed_app(folder, env, {"saas": "p", "rival": "p"}, workers=3) as (server, _, keys):
        yield Stack(server.url, keys)


def call(s: Stack, holder: str, end_user: str, i: int) -> bool:
    """One call for ``end_user`` of ``holder``, by the i-th of four ways (each SDK, plain and
    streamed): True when served, False on a 429 naming the end user's layer."""
    key = s.keys[holder]
    try:
        if i % 4 < 2:
            with openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0) as oai:
                if i % 4 == 0:
                    oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO,
                                                user=end_user)
                else:
                    with oai.chat.completions.create(
                            model="gpt-4o-mini", messages=HELLO, stream=True,
                            safety_identifier=end_user) as stream:
                        assert list(stream)
        else:
            with anthropic.Anthropic(base_url=s.url, api_key=key, max_retries=0) as ant:
                meta = {"user_id": end_user}
                if i % 4 == 2:
                    ant.messages.create(model="claude-3-5-haiku-latest", max_tokens=20,
                                        messages=HELLO, metadata=meta)
                else:
                    with ant.messages.stream(model="claude-3-5-haiku-latest", max_tokens=20,
                                             messages=HELLO,
                                             metadata=meta) as events:
                        assert events.get_final_message().content
        return True
    except (openai.RateLimitError, anthropic.RateLimitError) as exc:
        assert exc.response.headers["Retry-After"]
        assert "end_user/quota-day" in exc.response.text, exc.response.text
        return False


def test_racing_sdks_admit_exactly_the_end_users_quota_and_the_ledger_lists_them(
        stack: Stack) -> None:
    jobs = [("saas", "alice", i) for i in range(12)] + [("saas", "bob", i) for i in range(6)]
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda job: call(stack, *job), jobs))
    assert sum(served[:12]) == QUOTA and sum(served[12:]) == QUOTA, served
    # Another key's "alice" is another end user: saas's alice spent hers, this one has all.
    assert all(call(stack, "rival", "alice", i) for i in range(QUOTA))
    assert not call(stack, "rival", "alice", 1)
    usage = httpx.get(stack.url + "/v1/usage",
                      headers={"Authorization": f"Bearer {stack.keys['saas']}"}).json()
    quota = next(layer for layer in usage["layers"] if layer["layer"] == "quota-day")
    assert quota["remaining"] == 1000 - 2 * QUOTA     # refusals charged the holder nothing
    spend = httpx.get(stack.url + "/admin/spend/user/saas",
                      headers={"Authorization": f"Bearer {ADMIN}"}).json()
    top = {row["end_user"]: row for row in spend["end_users"]["top"]}
    assert set(top) == {"alice", "bob"}
    assert top["alice"]["requests"] == top["bob"]["requests"] == QUOTA
    assert top["alice"]["usd_micros"] > 0 and top["alice"]["output_tokens"] > 0
    assert sum(row["requests"] for row in top.values()) == spend["days"][-1]["requests"]

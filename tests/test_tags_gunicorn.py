"""Tags under gunicorn with three workers on a real Valkey: two keys of two users bearing one
tag, made by `flask keys create --tag`, race through the real openai and anthropic SDKs,
plain and streamed; exactly the tag's quota passes, and the ledger books it to the tag."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import redis

from app import create_app
from tests.conftest import keyed_app
from tests.policies import LOADED, plan, policy

pytestmark = pytest.mark.slow

TAG = "project=search"
QUOTA = 10
ADMIN = "admin-token-" + "y" * 32
POLICY = policy(
    store=LOADED, per_ip="100000 per 10 seconds", default="roomy",
    plans={"roomy": plan(500, 50, "10000 per day")},
    models={"gpt-4o-mini": {"provider": "openai", "input_usd_per_million": 100,
                            "output_usd_per_million": 400},
            "claude-3-5-haiku-latest": {"provider": "anthropic", "input_usd_per_million": 100,
                                        "output_usd_per_million": 400}},
) + f'\n[tags."{TAG}"]\nquotas = ["{QUOTA} per day"]\n'
HELLO = [{"role": "user", "content": "hello"}]


def test_two_keys_of_one_tag_pass_exactly_its_quota_across_workers_and_sdks(
        tmp_path: Path, redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushall()
    (tmp_path / "limits.toml").write_text(POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(tmp_path / "limits.toml"),
           "ADMIN_TOKEN": ADMIN}
    users = {"ann": "roomy", "ben": "roomy", "cat": "roomy"}
    tagged = {"ann": ["--tag", TAG], "ben": ["--tag", TAG, "--tag", "env=prod"]}
    with keyed_app(tmp_path, env, users, workers=3, more=tagged) as (server, _fp, keys):

        def call(i: int) -> bool:
            """One request of key ann or ben, in one of the four ways; True: served."""
            key = keys["ann" if i % 2 else "ben"]
            way = i // 2 % 4
            try:
                if way < 2:
                    with openai.OpenAI(base_url=server.url + "/v1", api_key=key,
                                       max_retries=0, timeout=60) as oai:
                        if way == 0:
                            oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO,
                                                        max_tokens=20)
                        else:
                            chunks = list(oai.chat.completions.create(
                                model="gpt-4o-mini", messages=HELLO, max_tokens=20,
                                stream=True, stream_options={"include_usage": True}))
                            assert chunks[-1].usage is not None
                    return True
                with anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0,
                                         timeout=60) as ant:
                    if way == 2:
                        ant.messages.create(model="claude-3-5-haiku-latest", max_tokens=20,
                                            messages=HELLO)
                    else:
                        with ant.messages.stream(model="claude-3-5-haiku-latest",
                                                 max_tokens=20, messages=HELLO) as stream:
                            assert stream.get_final_message().usage.output_tokens > 0
                return True
            except (openai.RateLimitError, anthropic.RateLimitError) as refused:
                assert refused.response.headers.get("Retry-After")
                assert f"tag:{TAG}/quota-day" in refused.response.text
                return False

        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(call, range(3 * QUOTA)))
        assert served.count(True) == QUOTA, served
        # A key without the tag is not limited by it.
        with openai.OpenAI(base_url=server.url + "/v1", api_key=keys["cat"],
                           max_retries=0) as oai:
            assert oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO,
                                               max_tokens=5).choices
        spend = httpx.get(server.url + f"/admin/spend?tag={TAG}", timeout=30,
                          headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert spend["total"]["requests"] == QUOTA
        assert {row["user"] for row in spend["top"]} <= {"ann", "ben"}
    engine = create_app(dict(env)).extensions["llm_limiter"].engine
    left = {s.layer.name: s.remaining
            for s in engine.peek_tag(engine.policy.tags[TAG]).states}
    assert left == {f"tag:{TAG}/quota-day": 0}

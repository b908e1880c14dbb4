"""A realistic state for the usage page, so its screenshots can be made again: gunicorn before
the fake provider, keys on two plans, anonymous /chat ids (one hostile), spend on two priced
models, refusals by a quota and by the rate bucket, pacing learnt from the provider's headers.

    USAGE_SCREENSHOTS=docs .venv/bin/python -m pytest -q tests/test_usage_page.py -k realistic
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai

from app import create_app
from fakeprovider import FakeProvider
from tests.conftest import write_policy
from tests.policies import loaded_toml

ADMIN = "admin-secret-of-at-least-32-characters"
GPT, CLAUDE = "gpt-4o-mini", "claude-3-5-haiku-latest"
PRICES = {GPT: (0.15, 0.60), CLAUDE: (0.80, 4.00)}        # USD per million in, out
HOSTILE = '<img src=x onerror="document.title=1">'
POLICY = loaded_toml() + f"""
[edge]
per_ip = ["100000 per minute"]
[defaults]
plan = "anon"
[plans.anon]
burst = 5
refill_per_second = 0.01
quotas = ["200 per day"]
[plans.free]
burst = 20
refill_per_second = 1
quotas = ["6 per day"]
tokens_per_minute = 20000
budget_usd_per_day = 0.05
[plans.pro]
burst = 50
refill_per_second = 5
quotas = ["5000 per day"]
tokens_per_minute = 200000
budget_usd_per_day = 20
max_concurrent = 8
[users]
page-user = "anon"
[models."{GPT}"]
provider = "openai"
requests_per_minute = 300
tokens_per_minute = 150000
input_usd_per_million = {PRICES[GPT][0]}
output_usd_per_million = {PRICES[GPT][1]}
[models."{CLAUDE}"]
provider = "anthropic"
requests_per_minute = 60
input_usd_per_million = {PRICES[CLAUDE][0]}
output_usd_per_million = {PRICES[CLAUDE][1]}
"""


@dataclass
class State:
    url: str
    refused: dict[str, int] = field(default_factory=dict)   # layer -> refusals seen


def _call(url: str, key: str, model: str, words: int) -> str | None:
    """One SDK call for ``model``; the layer that refused it (None: served)."""
    messages: Any = [{"role": "user", "content": "tell me about rate limits " * words}]
    try:
        if model == GPT:
            openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20
                          ).chat.completions.create(model=model, messages=messages,
                                                    max_tokens=120)
        else:
            anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=20
                                ).messages.create(model=model, messages=messages,
                                                  max_tokens=120)
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        assert exc.status_code == 429, exc
        # The dialects' bodies have no layer field; our message names it.
        return "quota-day" if "quota-day" in exc.response.text else exc.response.text
    return None


@contextmanager
def realistic(gunicorn: Any, tmp_path: Path, unix_url: str) -> Iterator[State]:
    """The app with the traffic above already through it."""
    policy = write_policy(tmp_path, POLICY)
    prices = {m: {"input": p[0], "output": p[1], "cached_input": p[0] / 2,
                  "cache_write": p[0] * 1.25} for m, p in PRICES.items()}
    with FakeProvider(rpm=500, tpm=400_000, prices=prices) as fp:
        server = gunicorn(REDIS_URL=unix_url, LIMITS_CONFIG=policy, ADMIN_TOKEN=ADMIN,
                          WEB_CONCURRENCY="2", UPSTREAM_TIMEOUT="5", REQUIRE_API_KEY="0",
                          OPENAI_API_KEY="sk-fake", OPENAI_BASE_URL=fp.url + "/v1",
                          ANTHROPIC_API_KEY="sk-fake", ANTHROPIC_BASE_URL=fp.url)
        keys = create_app({"REDIS_URL": unix_url, "LIMITS_CONFIG": policy}
                          ).extensions["llm_limiter"].keys
        state = State(server.url)
        plan_of = {"alice": "pro", "bob": "free", "carol": "free", "dev-team": "pro"}
        key = {user: keys.create(user, plan=plan)[0] for user, plan in plan_of.items()}
        calls = ([("alice", GPT, 40)] * 10 + [("alice", CLAUDE, 60)] * 6
                 + [("dev-team", CLAUDE, 120)] * 4 + [("dev-team", GPT, 20)] * 3
                 + [("bob", GPT, 10)] * 9 + [("carol", CLAUDE, 8)] * 5)
        for user, model, words in calls:
            layer = _call(server.url, key[user], model, words)
            if layer is not None:
                state.refused[layer] = state.refused.get(layer, 0) + 1
        # The provider's word on its windows lasts an hour from here on, so the pages drawn
        # below (minutes later on a loaded box) still have it: one admitted call per model
        # brings it. Before, a word of the fake's real one-minute window could go stale.
        fp.set_ratelimit_headers(reset_requests=3600, reset_tokens=3600)
        for model in (GPT, CLAUDE):
            assert _call(server.url, key["alice"], model, 2) is None
        for user, count in (("guest-7f3a", 3), ("page-user", 2), ("kiosk-12", 8), (HOSTILE, 1)):
            for _ in range(count):
                ok = httpx.post(server.url + "/chat", timeout=20,
                                json={"message": "hello there", "user_id": user,
                                      "model": GPT})
                if ok.status_code == 429:
                    layer = ok.json().get("layer", "?")
                    state.refused[layer] = state.refused.get(layer, 0) + 1
        yield state

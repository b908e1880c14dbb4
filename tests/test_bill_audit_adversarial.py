"""The bill audit, hostile half (issue 19): prompts that tokenize badly, tool calls and tool
results, tool definitions and Anthropic's client tools, inline PDFs, and streams cut before
the usage report, with the fake provider billing prompts by a real tokenizer (bpe-openai's,
see fakeprovider/render.py) and serving requests that leave the tier open at a dearer tier.
Still: provider-billed <= charged <= reserved, in tokens and in dollars, for every call.

Bounded: 160 calls from 8 threads, well inside the token window's minute.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import redis
from pypdf import PdfWriter

from fakeprovider import render
from limiting.core.llm import estimate_input_tokens
from tests.conftest import Gunicorn
from tests.test_bill_audit import (
    BUDGET,
    CLAUDE,
    GPT,
    POLICY,
    PRICES,
    TOKENS,
    layers_left,
    open_stack,
)

TIER = 1.7
TIERED = POLICY.replace('output_usd_per_million = ', 'service_tiers = { priority = 1.7 }\n'
                        'output_usd_per_million = ')
CALLS = 160
KINDS = ["plain", "stream", "cut", "cut"]


def _pdf(pages: int) -> str:
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=612, height=792)
    out = io.BytesIO()
    writer.write(out)
    return base64.b64encode(out.getvalue()).decode()


PDF = _pdf(5)


def _text(rng: random.Random) -> str:
    """Text a bytes-per-token guess undercounts."""
    n = rng.randint(2_000, 12_000)
    return rng.choice([
        "a " * n,
        "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(n // 4)),
        "".join(chr(rng.randint(0x1F300, 0x1FAFF)) for _ in range(n // 8)),
        " ".join(str(rng.getrandbits(64)) for _ in range(n // 10)),
        base64.b64encode(rng.randbytes(n)).decode(),
        "\n \t" * n,
    ])


@dataclass
class Call:
    model: str
    max_tokens: int
    body: dict[str, Any] = field(default_factory=dict)
    outcome: str = "ok"

    def reserved_tokens(self) -> int:
        return estimate_input_tokens(self.body["messages"], self.body.get("system"),
                                     model=self.model, tools=self.body.get("tools")) \
            + self.max_tokens

    def reserved_micros(self) -> float:
        price_in, price_out = PRICES[self.model]
        return (self.reserved_tokens() - self.max_tokens) * price_in * TIER \
            + self.max_tokens * price_out * TIER


def _openai_body(rng: random.Random) -> dict[str, Any]:
    shape = rng.choice(["text", "tools", "pdf"])
    if shape == "text":
        return {"messages": [{"role": "user", "content": _text(rng)}]}
    if shape == "pdf":
        return {"messages": [{"role": "user", "content": [
            {"type": "file", "file": {"filename": "a.pdf",
                                      "file_data": "data:application/pdf;base64," + PDF}},
            {"type": "text", "text": "sum it up"}]}]}
    args = json.dumps({"q": _text(rng)})
    return {"messages": [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "lookup", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": _text(rng)}],
        "tools": [{"type": "function", "function": {
            "name": "lookup", "description": _text(rng)[:2000],
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]}


def _anthropic_body(rng: random.Random) -> dict[str, Any]:
    shape = rng.choice(["text", "tools", "pdf"])
    if shape == "text":
        return {"system": _text(rng)[:3000], "messages": [{"role": "user", "content": _text(rng)}]}
    if shape == "pdf":
        return {"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": PDF}},
            {"type": "text", "text": "sum it up"}]}]}
    return {"messages": [
        {"role": "user", "content": "run it"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "tu_1", "name": "bash",
                                           "input": {"command": _text(rng)}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1",
                                      "content": [{"type": "text", "text": _text(rng)}]}]}],
        "tools": [{"type": "bash_20250124", "name": "bash"}]}


def one(i: int, server: Gunicorn, key: str, clients: threading.local) -> Call:
    rng = random.Random(i)
    if not hasattr(clients, "oai"):
        clients.oai = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0,
                                    timeout=30)
        clients.ant = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0,
                                          timeout=30)
    kind = rng.choice(KINDS)
    model = rng.choice([GPT, CLAUDE])
    call = Call(model, rng.randint(5, 40))
    call.body = _openai_body(rng) if model == GPT else _anthropic_body(rng)
    keep = rng.randint(1, 3) if kind == "cut" else None
    try:
        if model == GPT:
            answer = clients.oai.chat.completions.create(
                model=model, max_tokens=call.max_tokens, stream=kind != "plain", **call.body)
        elif kind == "plain":
            answer = clients.ant.messages.create(model=model, max_tokens=call.max_tokens,
                                                 **call.body)
        else:
            answer = clients.ant.messages.create(model=model, max_tokens=call.max_tokens,
                                                 stream=True, **call.body)
        if kind != "plain":
            for n, _ in enumerate(answer):
                if keep is not None and n + 1 >= keep:
                    call.outcome = "cut"
                    break
            answer.close()
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        call.outcome = str(exc.status_code)
    return call


@pytest.fixture
def stack(gunicorn, tmp_path: Path, r: redis.Redis, unix_url: str):  # type: ignore[no-untyped-def]
    with open_stack(gunicorn, tmp_path, unix_url, TIERED, "hostile",
                    fake={"tokenizer": True}, WEB_CONCURRENCY="1",
                    UPSTREAM_TIMEOUT="10") as opened:
        assert render.available(), "the audit bills by a real tokenizer"
        opened[1].set_service_tier("priority", {"priority": TIER})
        yield opened


def test_bill_audit_hostile_prompts_tools_pdfs_cut_streams(stack, r: redis.Redis) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server, fp, app, key = stack
    clients = threading.local()
    with ThreadPoolExecutor(8) as pool:
        calls = list(pool.map(lambda i: one(i, server, key, clients), range(CALLS)))
    fp.quiesce(timeout=10)
    outcomes = Counter(c.outcome for c in calls)
    print(f"\nhostile audit outcomes {dict(outcomes)}")
    # 429: ours, nothing reserved; 504: the fake was slower than our timeout (it bills).
    assert set(outcomes) <= {"ok", "cut", "429", "504"}, outcomes
    assert outcomes["ok"] > 30 and outcomes["cut"] > 30
    calls = [c for c in calls if c.outcome != "429"]
    # Each call on its own: a cut stream is charged its reservation, so an estimate below the
    # prompt's bill is free work, whatever the totals say (they hid one until a CI run's 429s
    # fell on other calls).
    short = [(i, c.model) for i, c in enumerate(calls)
             if c.reserved_tokens() - c.max_tokens < render.prompt_tokens(c.body)]
    assert not short, f"reserved below the prompt's bill: {short}"
    # Cut streams settle as their worker sees it: a loaded box's bound, under the 60 s lease TTL.
    deadline = time.monotonic() + 30
    while r.zcard("rl:{u:hostile}:cc") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.zcard("rl:{u:hostile}:cc") == 0, "a lease was left behind"

    meter = fp.meter()
    left = layers_left(app, "hostile")
    used_tokens = TOKENS - left["tokens-day"]     # POLICY's day window: nothing leaves it
    used_micros = round(BUDGET * 1e6) - left["usd-day"]
    billed_tokens = meter.input_tokens + meter.cache_write_tokens + meter.output_tokens
    print(f"tokens: billed {billed_tokens} charged {used_tokens}; micro-USD: billed "
          f"{meter.usd * 1e6:.0f} charged {used_micros}")
    assert used_tokens >= billed_tokens, "the provider billed work we did not charge"
    assert used_micros >= meter.usd * 1e6 - len(calls), "dollars billed beyond the charge"
    reserved_tokens = sum(c.reserved_tokens() for c in calls)
    reserved_micros = sum(c.reserved_micros() for c in calls)
    print(f"reserved: tokens {reserved_tokens}, micro-USD {reserved_micros:.0f}")
    assert used_tokens <= reserved_tokens, "we charged more than was ever reserved"
    assert used_micros <= reserved_micros + len(calls)

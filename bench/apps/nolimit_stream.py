"""Contender ``none`` of the streaming section: POST /v1/chat/completions with no limiter.

The same OpenAI-compatible streaming passthrough as the project's endpoint, minus every
limiter step: parse the body, open the upstream stream with the official ``openai`` SDK
(``stream=True``, one client per worker, no retries), relay each ``data: ...`` event as
it arrives and end with ``data: [DONE]``. Like the project it reads the raw SSE lines
(``with_raw_response``) rather than re-serialising SDK objects, so the two differ only by
the limiter. Run under ``bench/gunicorn_baseline.py`` (gevent, same settings as the other
baselines); OPENAI_BASE_URL points at the bench's fake provider.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import cache
from typing import Any

import openai
from flask import Flask, Response, jsonify, request, stream_with_context

app = Flask(__name__)


@cache
def client() -> openai.OpenAI:
    # Built on first use, inside the (already gevent-patched) worker.
    return openai.OpenAI(
        api_key=os.environ.get("OPENAI_API_KEY", "sk-fake"),
        base_url=os.environ.get("OPENAI_BASE_URL"),
        max_retries=0,
        timeout=float(os.environ.get("UPSTREAM_TIMEOUT", "60")),
    )


def error(status: int, message: str, code: str) -> tuple[Response, int]:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return jsonify(body), status


def relay(response: Any) -> Iterator[str]:
    """The upstream's data events, verbatim, one SSE event per yield."""
    try:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            yield f"data: {data}\n\n"
            if data == "[DONE]":
                return
        body = {"error": {"message": "upstream stream ended early", "code": "upstream_error"}}
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        response.close()


@app.post("/v1/chat/completions")
def chat_completions():
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return error(400, "body must be a JSON object with 'messages'", "invalid_request")
    params = {k: v for k, v in body.items() if k != "stream"}
    if not body.get("stream"):
        try:
            reply = client().chat.completions.with_raw_response.create(**params)
            return Response(reply.http_response.read(), mimetype="application/json")
        except openai.OpenAIError as exc:
            return error(502, str(exc), "upstream_error")
    try:
        raw = client().chat.completions.with_raw_response.create(**params, stream=True)
    except openai.OpenAIError as exc:
        return error(502, str(exc), "upstream_error")
    response = Response(stream_with_context(relay(raw.http_response)), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.call_on_close(raw.http_response.close)  # a relay never started runs no finally
    return response

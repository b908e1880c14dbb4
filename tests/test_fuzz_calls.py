"""Fuzzing the calls: POST /chat, /v1/chat/completions and /v1/messages, and GET /v1/usage
(set-up: tests/fuzzing.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import fuzzing
from tests.fuzz_strategies import (
    CONTENT_TYPES,
    HOSTILE_STRINGS,
    MODEL_NAMES,
    QUERIES,
    USER_IDS,
    any_json,
    authorization,
    body_bytes,
    content_type_headers,
    encode,
    extra_environ,
    hostile_text,
    long_text,
    one_wrong,
    wrong,
)
from tests.fuzzing import FINISHED, Case, Req, Target, fuzz, run_case

# Both fuzz modules on one xdist worker: test_fuzz_web's last test counts what they all sent.
pytestmark = pytest.mark.xdist_group("fuzz")

target = fuzzing.target  # the apps under test, a fixture of this module

# --- /chat ----------------------------------------------------------------------------------------

chat_objects = st.fixed_dictionaries({}, optional={
    "message": wrong(st.text(min_size=1)),
    "user_id": wrong(st.sampled_from(USER_IDS)),
    "model": wrong(st.sampled_from(MODEL_NAMES)),
    "max_tokens": any_json,
    "extra": any_json,
})
nonblank = st.text(min_size=1, max_size=200).filter(lambda s: s.strip())
valid_chat = st.fixed_dictionaries(
    {"message": st.one_of(nonblank, st.sampled_from(["hi", "hello big world", "é ☃ 🙂",
                                                     "{u:victim} \x00", "a" * 50_000]))},
    optional={"model": st.just("echo")},
)


CHAT_WRONG = {
    "message": st.one_of(st.sampled_from(HOSTILE_STRINGS), long_text()),
    "user_id": st.sampled_from(USER_IDS),
    "model": st.sampled_from(MODEL_NAMES),
}



@st.composite
def chat_case(draw: st.DrawFn, keys: dict[str, str]) -> Case:
    keyed = draw(st.integers(0, 3)) == 0
    headers = content_type_headers(draw(st.sampled_from(CONTENT_TYPES)))
    query = draw(st.sampled_from(QUERIES))
    user = draw(st.sampled_from(sorted(keys)))
    mode = draw(st.integers(0, 19))
    if mode < 12:    # well-formed (must answer 200), or with exactly one field made wrong
        body = draw(valid_chat)
        environ = {}
        if keyed:
            environ["HTTP_AUTHORIZATION"] = f"Bearer {keys[user]}"
            if draw(st.booleans()):
                body["user_id"] = user
        else:
            body["user_id"] = draw(st.one_of(
                st.sampled_from([u for u in USER_IDS if u.strip() and len(u) <= 256]),
                nonblank))
        if mode >= 5:
            body = draw(one_wrong(body, CHAT_WRONG))
            environ.update(draw(extra_environ()))
        data = encode(body, draw(st.sampled_from(["ascii", "utf8"])))
        return Case(Req("POST", "/chat", data, headers, environ, query), mode < 5, keyed)
    auth, made_up = draw(authorization(keys[user])) if keyed else (None, None)
    environ = draw(extra_environ(auth))
    data = draw(body_bytes(chat_objects))
    return Case(Req("POST", "/chat", data, headers, environ, query), False, keyed, made_up)



@pytest.mark.slow
@fuzz(500)
@given(case=st.data())
def test_fuzz_chat(target: Target, case: st.DataObject) -> None:
    c = case.draw(chat_case(target.keys), label="case")
    _, body = run_case(target, c)
    if c.must_pass:
        assert set(body) == {"reply"} and body["reply"].startswith("echo:"), body
    FINISHED.add("test_fuzz_chat")


# --- /v1/chat/completions -------------------------------------------------------------------------

text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=60)})
valid_content = st.one_of(st.text(max_size=200), st.sampled_from(HOSTILE_STRINGS),
                          st.lists(text_part, min_size=1, max_size=3))
valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]),
                           "content": valid_content}),
    min_size=1, max_size=3)
hostile_messages = st.one_of(
    any_json,
    st.just([]),
    st.lists(any_json, min_size=1, max_size=3),
    st.lists(st.fixed_dictionaries({}, optional={"role": wrong(st.just("user")),
                                                 "content": wrong(valid_content)}),
             min_size=1, max_size=3),
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(
        any_json, max_size=4)}), min_size=1, max_size=2),
)
max_tokens_values = st.one_of(
    st.integers(min_value=1, max_value=5000),
    st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63, 10**30, 10**4000, 1.0, 1.5, True, False,
                     "10", "", None, float("inf"), float("nan"), [], {}]),
    any_json,
)
unknown_field = st.dictionaries(st.sampled_from(["functions_x", "__proto__", "constructor",
                                                 "model ", "MESSAGES", "", "\x00", "{u:victim}"]),
                                any_json, max_size=2)


def objects_with(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects with any of these fields, and now and then an unknown one besides."""
    return st.builds(lambda known, extra: {**known, **extra},
                     st.fixed_dictionaries({}, optional=fields),
                     st.one_of(st.just({}), st.just({}), unknown_field))


openai_objects = objects_with({
    "model": wrong(st.sampled_from(MODEL_NAMES)),
    "messages": st.one_of(valid_messages, hostile_messages),
    "max_tokens": max_tokens_values,
    "max_completion_tokens": max_tokens_values,
    "stream": wrong(st.booleans()),
    "stream_options": wrong(st.fixed_dictionaries({}, optional={
        "include_usage": wrong(st.booleans())})),
    "n": wrong(st.sampled_from([1, 2, 0, -1])),
    "temperature": wrong(st.floats(0, 2)),
    "user": hostile_text,
    "tools": any_json,
    "tool_choice": any_json,
    "response_format": any_json,
    "logit_bias": any_json,
    "metadata": any_json,
    "stop": any_json,
    "seed": max_tokens_values,
})

OPENAI_WRONG = {
    "model": st.sampled_from(MODEL_NAMES), "messages": hostile_messages,
    "max_tokens": max_tokens_values, "max_completion_tokens": max_tokens_values,
    "stream": any_json, "stream_options": any_json, "n": any_json, "temperature": any_json,
    "tools": any_json, "user": hostile_text, "logit_bias": any_json,
    "functions_x": any_json, "": any_json, "{u:victim}": any_json,     # unknown fields
}


@st.composite
def valid_openai(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "echo", "messages": draw(valid_messages)}
    stream = draw(st.booleans())
    if stream or draw(st.booleans()):
        body["stream"] = stream
    if stream and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    for name, value in (("max_tokens", st.integers(1, 4000)),
                        ("max_completion_tokens", st.integers(1, 4000)),
                        ("temperature", st.floats(0, 2)), ("n", st.just(1)),
                        ("user", st.text(max_size=40)), ("seed", st.integers(0, 2**31)),
                        ("stop", st.lists(st.text(max_size=5), max_size=2)),
                        ("metadata", st.dictionaries(st.text(max_size=8), st.text(max_size=8),
                                                     max_size=2))):
        if draw(st.integers(0, 3)) == 0:
            body[name] = draw(value)
    return body


@st.composite
def v1_case(draw: st.DrawFn, keys: dict[str, str], path: str,
            objects: st.SearchStrategy[Any], valid: st.SearchStrategy[dict[str, Any]],
            wrongs: dict[str, st.SearchStrategy[Any]], key_header: str | None = None) -> Case:
    headers = content_type_headers(draw(st.sampled_from(CONTENT_TYPES)))
    query = draw(st.sampled_from(QUERIES))
    key = keys[draw(st.sampled_from(sorted(keys)))]
    mode = draw(st.integers(0, 19))
    if mode < 12:    # well-formed with a valid key (must answer 200), or one field made wrong
        body = draw(valid)
        environ = {}
        if key_header and draw(st.booleans()):
            environ[key_header] = draw(st.sampled_from([key, f"  {key} "]))
        else:
            environ["HTTP_AUTHORIZATION"] = draw(st.sampled_from([f"Bearer {key}",
                                                                  f"bearer  {key} "]))
        if mode >= 5:
            body = draw(one_wrong(body, wrongs))
            environ.update(draw(extra_environ()))
        data = encode(body, draw(st.sampled_from(["ascii", "utf8"])))
        return Case(Req("POST", path, data, headers, environ, query), mode < 5,
                    stream=body.get("stream") is True)
    auth, made_up = draw(authorization(key))
    environ = draw(extra_environ(auth))
    if key_header and draw(st.integers(0, 3)) == 0:
        environ[key_header] = draw(st.sampled_from(
            [key, "", " ", "x", "llm_", made_up or "llm_x", "q" * 5000, f"{key}\r\nX: 1",
             f"Bearer {key}"]))
    data = draw(body_bytes(objects))
    return Case(Req("POST", path, data, headers, environ, query), made_up=made_up)


@pytest.mark.slow
@fuzz(600)
@given(case=st.data())
def test_fuzz_openai(target: Target, case: st.DataObject) -> None:
    c = case.draw(v1_case(target.keys, "/v1/chat/completions", openai_objects, valid_openai(),
                          OPENAI_WRONG), label="case")
    resp, body = run_case(target, c)
    if not c.must_pass:
        FINISHED.add("test_fuzz_openai")
        return
    if c.stream:
        assert resp.mimetype == "text/event-stream"
        assert body[-1] == (None, "[DONE]"), body
        chunks = [json.loads(data) for _, data in body[:-1]]
        assert all(ch["object"] == "chat.completion.chunk" and "error" not in ch
                   for ch in chunks), chunks
        text = "".join(ch["choices"][0]["delta"].get("content") or ""
                       for ch in chunks if ch["choices"])
        assert text.startswith("echo:"), text
    else:
        assert body["object"] == "chat.completion" and body["model"] == "echo", body
        assert body["choices"][0]["message"]["content"].startswith("echo:"), body
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    FINISHED.add("test_fuzz_openai")


# --- /v1/messages ---------------------------------------------------------------------------------

anthropic_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                           "content": st.one_of(valid_content, st.lists(st.fixed_dictionaries(
                               {"type": st.just("tool_result"), "tool_use_id": st.text(max_size=8),
                                "content": valid_content}), min_size=1, max_size=2))}),
    min_size=1, max_size=3)
system_values = st.one_of(st.text(max_size=100), st.lists(text_part, max_size=2))

anthropic_objects = objects_with({
    "model": wrong(st.sampled_from(MODEL_NAMES)),
    "messages": st.one_of(anthropic_messages, hostile_messages),
    "max_tokens": max_tokens_values,
    "stream": wrong(st.booleans()),
    "system": wrong(system_values),
    "temperature": wrong(st.floats(0, 1)),
    "top_k": max_tokens_values,
    "top_p": any_json,
    "stop_sequences": any_json,
    "metadata": wrong(st.fixed_dictionaries({"user_id": hostile_text})),
    "tools": any_json,
    "tool_choice": any_json,
    "thinking": any_json,
    "stream_options": any_json,     # an OpenAI field: unknown here
})

ANTHROPIC_WRONG = {
    "model": st.sampled_from(MODEL_NAMES), "messages": hostile_messages,
    "max_tokens": max_tokens_values, "stream": any_json, "system": any_json,
    "temperature": any_json, "top_k": any_json, "metadata": any_json, "tools": any_json,
    "stream_options": any_json, "n": any_json, "\x00": any_json,  # unknown fields
}


@st.composite
def valid_anthropic(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "echo", "messages": draw(anthropic_messages),
                            "max_tokens": draw(st.integers(1, 4000))}
    for name, value in (("stream", st.booleans()), ("system", system_values),
                        ("temperature", st.floats(0, 1)), ("top_k", st.integers(1, 100)),
                        ("stop_sequences", st.lists(st.text(max_size=5), max_size=2)),
                        ("metadata", st.fixed_dictionaries({"user_id": st.text(max_size=20)}))):
        if draw(st.integers(0, 2)) == 0:
            body[name] = draw(value)
    return body


@pytest.mark.slow
@fuzz(600)
@given(case=st.data())
def test_fuzz_anthropic(target: Target, case: st.DataObject) -> None:
    c = case.draw(v1_case(target.keys, "/v1/messages", anthropic_objects, valid_anthropic(),
                          ANTHROPIC_WRONG, key_header="HTTP_X_API_KEY"), label="case")
    resp, body = run_case(target, c)
    if not c.must_pass:
        FINISHED.add("test_fuzz_anthropic")
        return
    if c.stream:
        assert resp.mimetype == "text/event-stream"
        names = [name for name, _ in body]
        assert names[0] == "message_start" and names[-1] == "message_stop", names
        assert "error" not in names, body
        text = "".join(json.loads(data)["delta"]["text"]
                       for name, data in body if name == "content_block_delta")
        assert text.startswith("echo:"), text
    else:
        assert body["type"] == "message" and body["model"] == "echo", body
        assert body["content"][0]["type"] == "text", body
        assert body["content"][0]["text"].startswith("echo:"), body
        assert isinstance(body["usage"]["input_tokens"], int), body
    FINISHED.add("test_fuzz_anthropic")


# --- GET /v1/usage --------------------------------------------------------------------------------


@st.composite
def usage_case(draw: st.DrawFn, keys: dict[str, str]) -> tuple[Case, str | None]:
    user = draw(st.sampled_from(sorted(keys)))
    key = keys[user]
    query = draw(st.sampled_from(QUERIES))
    if draw(st.integers(0, 2)) == 0:
        environ = ({"HTTP_AUTHORIZATION": f"Bearer {key}"} if draw(st.booleans())
                   else {"HTTP_X_API_KEY": key})
        return Case(Req("GET", "/v1/usage", None, None, environ, query), True), user
    auth, made_up = draw(authorization(key))
    environ = draw(extra_environ(auth))
    if draw(st.integers(0, 2)) == 0:
        environ["HTTP_X_API_KEY"] = draw(st.sampled_from(
            ["", " ", f" {key}", made_up or "", "z" * 5000, f"{key}\r\nX: 1", "{u:victim}"]))
    data = draw(st.one_of(st.none(), body_bytes(any_json)))
    return Case(Req("GET", "/v1/usage", data, None, environ, query), made_up=made_up), None


@fuzz(250)
@given(case=st.data())
def test_fuzz_usage(target: Target, case: st.DataObject) -> None:
    c, user = case.draw(usage_case(target.keys), label="case")
    _, body = run_case(target, c)
    if c.must_pass:
        assert body["user"] == user and isinstance(body["layers"], list), body
        assert all({"layer", "limit", "remaining", "reset"} <= set(x) for x in body["layers"])
    FINISHED.add("test_fuzz_usage")


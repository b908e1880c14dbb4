"""Fuzzing the operator's endpoints, unknown paths and methods and the body limit, and,
last, the count of requests every fuzz test sent (set-up: tests/fuzzing.py)."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import MAX_BODY_BYTES
from tests import fuzzing
from tests.fuzz_strategies import (
    CONTENT_TYPES,
    QUERIES,
    USER_IDS,
    any_json,
    body_bytes,
    content_type_headers,
    extra_environ,
    nested,
)
from tests.fuzzing import (
    ADMIN_TOKEN,
    COUNTS,
    FINISHED,
    FUZZ_TESTS,
    MIN_TOTAL,
    OTHER,
    ROUTES,
    STATUSES,
    Req,
    Target,
    check,
    fuzz,
    run,
    send,
)

target = fuzzing.target  # the apps under test, a fixture of this module

# --- /admin/usage and /admin/usage.json -----------------------------------------------------------


ADMIN_EXAMPLES = [0]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


admin_auth_good = st.sampled_from([
    f"Bearer {ADMIN_TOKEN}", f"bearer {ADMIN_TOKEN}", f"Bearer  {ADMIN_TOKEN}",
    basic("", ADMIN_TOKEN),
    basic("admin", ADMIN_TOKEN), basic("{u}victim\x00", ADMIN_TOKEN),
])
admin_auth_bad = st.one_of(st.sampled_from([
    "", "Bearer", "Bearer ", f"Bearer {ADMIN_TOKEN[:-1]}", f"Bearer {ADMIN_TOKEN}x",
    f"Token {ADMIN_TOKEN}", ADMIN_TOKEN, basic(ADMIN_TOKEN, ""),
    basic("admin", ADMIN_TOKEN.upper()), "Basic", "Basic !!!", "Basic " + "=" * 10,
    "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(), "Basic " + "QQ" * 5000,
    "Bearer é\xff", f"Bearer {ADMIN_TOKEN}\r\nX: 1", f"Bearer {ADMIN_TOKEN}\x00",
    'Digest username="admin", realm="x"', "Negotiate YIIB", "Bearer " + "t" * 20_000,
]), st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass").decode("latin-1")))


def users_query(users: list[str]) -> str:
    return "users=" + ",".join(quote(u, safe="%,", errors="surrogatepass") for u in users)


admin_queries = st.one_of(st.sampled_from(QUERIES), st.lists(
    st.sampled_from([*USER_IDS, "", "%00", "%7Bu:x%7D", "a,b", "%E2%98%83", "%ff"]),
    max_size=300).map(users_query))


@fuzz(250)
@given(path=st.sampled_from(["/admin/usage", "/admin/usage.json"]), good=st.booleans(),
       auth_good=admin_auth_good, auth_bad=st.one_of(st.none(), admin_auth_bad),
       query=admin_queries, environ=extra_environ())
def test_fuzz_admin(target: Target, path: str, good: bool, auth_good: str,
                    auth_bad: str | None, query: str, environ: dict[str, str]) -> None:
    environ = {k: v for k, v in environ.items() if k != "CONTENT_LENGTH"}
    # Failed admin credentials are limited per address (test_hardening checks that): each
    # example comes from an address of its own, so only the credential decides here.
    ADMIN_EXAMPLES[0] += 1
    environ["REMOTE_ADDR"] = f"198.18.{ADMIN_EXAMPLES[0] // 250 % 250}.{ADMIN_EXAMPLES[0] % 250}"
    auth = auth_good if good else auth_bad
    if auth is not None:
        environ["HTTP_AUTHORIZATION"] = auth
    resp, body = run(target, Req("GET", path, None, None, environ, query))
    if good:
        assert resp.status_code == 200, resp.get_data()[:300]
        if path.endswith(".json"):
            assert isinstance(body["users"], list) and isinstance(body["models"], list), body
            assert len(body["users"]) <= 200
    else:
        assert resp.status_code == 401, resp.get_data()[:300]
        assert resp.headers["WWW-Authenticate"].lower().startswith("basic")
    FINISHED.add("test_fuzz_admin")


# --- /healthz and /metrics ------------------------------------------------------------------------


@fuzz(100)
@given(path=st.sampled_from(["/healthz", "/metrics"]), query=st.sampled_from(QUERIES),
       environ=extra_environ(), auth=st.one_of(st.none(), admin_auth_bad),
       data=st.one_of(st.none(), st.binary(max_size=100)))
def test_fuzz_health_and_metrics(target: Target, path: str, query: str | None,
                                 environ: dict[str, str], auth: str | None,
                                 data: bytes | None) -> None:
    if auth is not None:
        environ = {**environ, "HTTP_AUTHORIZATION": auth}
    resp, body = run(target, Req("GET", path, data, None, environ, query))
    assert resp.status_code == 200, resp.get_data()[:300]
    if path == "/healthz":
        assert body["status"] == "ok" and body["store"] == "ok", body
    else:
        assert b"# TYPE" in resp.get_data()
    FINISHED.add("test_fuzz_health_and_metrics")


# --- unknown paths and wrong methods --------------------------------------------------------------

KNOWN_PATHS = sorted({path for _, path in ROUTES})
ODD_PATHS = [
    "/", "/v1", "/v1/", "/v1/chat/completions/", "/v1/chat", "/v1/models", "/v1/completions",
    "/v1/embeddings", "/v1/messages/batches", "/v1/messages/count_tokens", "/chat/",
    "/CHAT", "/admin", "/admin/", "/admin/usage.json/", "/admin/keys", "/healthz/", "/metrics.txt",
    "/%00", "/%ff", "/..%2f..%2fetc%2fpasswd", "/chat%0d%0aX-Injected:%201", "/static/../app.py",
    "/v1/usage;jsessionid=1", "/" + "a" * 5000, "/%7Bu:victim%7D", "//chat", "/v1//messages",
]


@fuzz(250)
@given(path=st.one_of(st.sampled_from(KNOWN_PATHS + ODD_PATHS),
                      st.text(max_size=30).map(lambda s: "/" + quote(s, safe="/:@"))),
       method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS",
                               "TRACE", "PROPFIND", "get"]),
       data=st.one_of(st.none(), body_bytes(any_json)),
       ctype=st.sampled_from(CONTENT_TYPES), environ=extra_environ())
def test_fuzz_unknown_paths_and_methods(target: Target, path: str, method: str,
                                        data: bytes | None, ctype: str | None,
                                        environ: dict[str, str]) -> None:
    if (method.upper(), path) in ROUTES:    # the routes themselves have their own tests
        method = "PUT"
    resp, _ = run(target, Req(method, path, data, content_type_headers(ctype), environ))
    if method in ("HEAD", "OPTIONS"):    # HEAD of a GET route is that GET, minus the body
        assert resp.status_code < 500, resp.status_code
    elif resp.status_code != 308:       # werkzeug merging "//" redirects
        assert resp.status_code in (404, 405), (method, path, resp.status_code)
    if resp.status_code == 405:
        assert resp.headers.get("Allow"), resp.headers
    FINISHED.add("test_fuzz_unknown_paths_and_methods")


# --- the 1 MiB body limit, on both sides --------------------------------------------------------


def padded(path: str, size: int) -> bytes:
    """A well-formed body for ``path`` of exactly ``size`` bytes (the message pads it)."""
    shapes = {
        "/chat": {"message": "", "user_id": "big"},
        "/v1/chat/completions": {"model": "echo", "messages": [{"role": "user", "content": ""}]},
        "/v1/messages": {"model": "echo", "max_tokens": 5,
                         "messages": [{"role": "user", "content": ""}]},
    }
    shape = shapes[path]
    overhead = len(json.dumps(shape).encode())
    text = "w " * ((size - overhead) // 2) + "w" * ((size - overhead) % 2)
    if path == "/chat":
        shape["message"] = text
    else:
        shape["messages"][0]["content"] = text
    data = json.dumps(shape).encode()
    assert len(data) == size
    return data


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("size", [MAX_BODY_BYTES - 16, MAX_BODY_BYTES, MAX_BODY_BYTES + 1,
                                  MAX_BODY_BYTES + 4096])
def test_body_size_boundary(target: Target, path: str, size: int) -> None:
    key = target.keys["fuzzer"]
    environ = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    resp, _ = run(target, Req("POST", path, padded(path, size), content_type_headers(
        "application/json"), environ))
    if size <= MAX_BODY_BYTES:
        assert resp.status_code == 200, resp.get_data()[:300]
    else:
        assert resp.status_code == 413, resp.get_data()[:300]
    FINISHED.add("test_body_size_boundary")


# --- regressions of bugs the fuzzing found ---------------------------------------------------


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("shape", ["array", "object"])
def test_deeply_nested_json_is_a_400(target: Target, path: str, shape: str) -> None:
    depth = 100_000
    data = (("[" * depth + "]" * depth) if shape == "array" else nested(depth)).encode()
    environ = {"HTTP_AUTHORIZATION": f"Bearer {target.keys['fuzzer']}"}
    req = Req("POST", path, data, content_type_headers("application/json"), environ)
    resp = send(target.client, req, count=False)
    check(resp, req, target.secrets)
    assert resp.status_code == 400, (resp.status_code, resp.get_data()[:300])


# --- the count ------------------------------------------------------------------------------------


def test_zz_at_least_a_thousand_requests() -> None:
    """Last in the file: how many requests each endpoint took, and the total."""
    missing = FUZZ_TESTS - FINISHED
    if missing:
        pytest.skip(f"not every fuzz test ran: {sorted(missing)}")
    width = max(map(len, COUNTS))
    lines = [f"  {label:<{width}}  {n:>5}   statuses {dict(sorted(STATUSES[label].items()))}"
             for label, n in sorted(COUNTS.items())]
    total = sum(COUNTS.values())
    lines.append(f"  {'total':<{width}}  {total:>5}")
    print("\nfuzz requests per endpoint:\n" + "\n".join(lines))
    for label in [f"{m} {p}" for m, p in ROUTES] + [OTHER]:
        assert COUNTS[label] > 0, f"{label} was never fuzzed"
    assert total >= MIN_TOTAL, COUNTS


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

# Both fuzz modules on one xdist worker: test_fuzz_web's last test counts what they all sent.
pytestmark = pytest.mark.xdist_group("fuzz")

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


METRICS_EXAMPLES = [0]


@fuzz(100)
@given(path=st.sampled_from(["/healthz", "/metrics"]), query=st.sampled_from(QUERIES),
       environ=extra_environ(), good=st.booleans(), auth_good=admin_auth_good,
       auth=st.one_of(st.none(), admin_auth_bad),
       data=st.one_of(st.none(), st.binary(max_size=100)))
def test_fuzz_health_and_metrics(target: Target, path: str, query: str | None,
                                 environ: dict[str, str], good: bool, auth_good: str,
                                 auth: str | None, data: bytes | None) -> None:
    """/healthz answers anyone; /metrics, with ADMIN_TOKEN set (as here), the token only."""
    if path == "/metrics":
        auth = auth_good if good else auth
        METRICS_EXAMPLES[0] += 1   # failures are limited per address: one address each
        n = METRICS_EXAMPLES[0]
        environ = {**environ, "REMOTE_ADDR": f"198.19.{n // 250 % 250}.{n % 250}"}
    if auth is not None:
        environ = {**environ, "HTTP_AUTHORIZATION": auth}
    resp, body = run(target, Req("GET", path, data, None, environ, query))
    if path == "/healthz":
        assert resp.status_code == 200, resp.get_data()[:300]
        assert body["status"] == "ok" and body["store"] == "ok", body
    elif good:
        assert resp.status_code == 200, resp.get_data()[:300]
        assert b"# TYPE" in resp.get_data()
    else:
        assert resp.status_code == 401, resp.get_data()[:300]
        assert b"llm_limiter" not in resp.get_data()
    FINISHED.add("test_fuzz_health_and_metrics")


# --- every query parameter of every route --------------------------------------------------------

# Each route's query parameters (the rest take none; they get the same values, ignored).
QUERY_PARAMS = {
    "/v1/usage": ("days",),
    "/admin/spend": ("day", "top", "by", "model", "days", "format"),
    "/admin/spend/user/fuzzer": ("realm", "days", "format", "day", "top", "by"),
    "/admin/usage.json": ("users",),
    "/admin/usage": ("users",),
    "/healthz": ("x",),
    "/metrics": ("x",),
}
# Digits str.isdigit/int/float/fromisoformat take that are not ASCII, and other odd text.
NON_ASCII_DIGITS = ["\u00b2", "\u0663", "\uff11", "\u0967", "\U0001d7ce", "\u2460", "\u00bd",
                    "\u0661\u0660", "\uff12\uff10\uff12\uff15-\uff10\uff11-\uff10\uff11"]
ODD_VALUES = [*NON_ASCII_DIGITS, "", " 7", "7 ", "+7", "-7", "0", "00007", "1_0", "1e3", "7.0",
              "0x10", "9" * 5000, "2025-W01-1", "20250101", "2025-1-1", "\x00", "\ud800", "csv",
              "json", "usd", "tok", "u", "b", "=1+1", "%", "NaN", "inf"]
query_value = st.one_of(st.sampled_from(ODD_VALUES),
                        st.text(alphabet=st.characters(categories=["Nd", "No", "Nl", "Zs"]),
                                min_size=1, max_size=6),
                        st.text(max_size=12))


@fuzz(300)
@given(path=st.sampled_from(sorted(QUERY_PARAMS)), data=st.data())
def test_fuzz_every_query_parameter(target: Target, path: str, data: st.DataObject) -> None:
    """Non-ASCII digits (which ``str.isdigit`` takes and ``int`` refuses or misreads), huge
    numbers and odd text in every query parameter: an answer, never a 5xx; a 400 is JSON
    with a code."""
    names = data.draw(st.lists(st.sampled_from(QUERY_PARAMS[path]), min_size=1, max_size=3))
    query = "&".join(f"{name}={quote(data.draw(query_value), safe='', errors='surrogatepass')}"
                     for name in names)
    auth = f"Bearer {target.keys['fuzzer']}" if path == "/v1/usage" else f"Bearer {ADMIN_TOKEN}"
    resp = send(target.client, Req("GET", path, None, None, {"HTTP_AUTHORIZATION": auth}, query),
                count=("GET", path) in ROUTES)   # /admin/spend* is not an "unknown path"
    assert resp.status_code in (200, 400), (path, query[:200], resp.status_code,
                                            resp.get_data()[:300])
    if resp.status_code == 400:
        body = resp.get_json()
        assert isinstance(body["error"], str) and body["code"] == "invalid_request", body
    FINISHED.add("test_fuzz_every_query_parameter")


@pytest.mark.parametrize("path", ["/v1/usage?days=", "/admin/spend?top=", "/admin/spend?days=",
                                  "/admin/spend/user/fuzzer?days="])
@pytest.mark.parametrize("value", [*NON_ASCII_DIGITS[:5], "9" * 5000])
def test_numbers_are_ascii_digits(target: Target, path: str, value: str) -> None:
    """The issue's case: ``?days=%C2%B2`` was a 500."""
    auth = f"Bearer {target.keys['fuzzer']}" if path.startswith("/v1") else f"Bearer {ADMIN_TOKEN}"
    resp = target.client.get(path + quote(value), headers={"Authorization": auth})
    assert resp.status_code == 400, (path, value[:20], resp.status_code)
    assert resp.get_json()["code"] == "invalid_request"


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


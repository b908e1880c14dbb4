"""Limits where the routes are: @token_bucket / @sliding_window, scopes, [routes], exempt,
deduct_when, shadow mode; every limit of a request in one call (real Valkey, Flask client)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Blueprint, Flask, request

from limiting import PolicyError, RateLimiter, Usage, current_limiter, parse_policy
from limiting import sliding_window as window_of
from tests.conftest import write_policy
from tests.policies import loaded_toml

POLICY = ("[edge]\nper_ip = ['10000 per minute']\n" + loaded_toml() +
          "[plans.free]\nburst = 3\nrefill_per_second = 0.0001\nquotas = ['100 per day']\n")
SLOW = 0.0001   # a bucket that does not refill within a test


def make_app(tmp_path: Path, redis_url: str, more: str = "") -> tuple[Flask, RateLimiter]:
    app = Flask("adopter")
    app.config.update(LIMITS_CONFIG=write_policy(tmp_path, POLICY + more), REDIS_URL=redis_url)
    return app, RateLimiter(app)


def codes(client: Any, url: str, n: int, **kw: Any) -> list[int]:
    return [client.post(url, **kw).status_code for _ in range(n)]


def acquire_calls(r: redis.Redis) -> int:
    """acquire.lua calls so far (EVALSHA count in the store's own stats)."""
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def test_token_bucket_alone(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    app, limiter = make_app(tmp_path, redis_url)

    @app.post("/tb")
    @limiter.token_bucket(burst=3, per_second=SLOW)
    def tb() -> dict[str, bool]:
        return {"ok": True}

    client = app.test_client()
    assert codes(client, "/tb", 5) == [200, 200, 200, 429, 429]
    refused = client.post("/tb")
    body = refused.get_json()
    assert body["code"] == "rate_limited" and body["layer"] == "route:tb"
    assert int(refused.headers["Retry-After"]) >= 1
    ok_headers = app.test_client().post("/tb", environ_base={"REMOTE_ADDR": "10.0.0.9"}).headers
    assert '"route:tb";q=3' in ok_headers["RateLimit-Policy"]
    assert '"edge"' in ok_headers["RateLimit-Policy"]     # the edge rode in the same call
    assert ok_headers["X-RateLimit-Remaining"] == "2"


def test_stacked_is_one_call_and_a_refusal_charges_none(tmp_path: Path, r: redis.Redis,
                                                         redis_url: str) -> None:
    app, limiter = make_app(tmp_path, redis_url)

    @app.post("/a")
    @limiter.token_bucket(5, SLOW, scope="shared")
    @limiter.sliding_window("2 per day")
    def a() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/b")
    @limiter.token_bucket(5, SLOW, scope="shared")
    def b() -> dict[str, bool]:
        return {"ok": True}

    client = app.test_client()
    before = acquire_calls(r)
    assert codes(client, "/a", 5) == [200, 200, 429, 429, 429]
    assert acquire_calls(r) - before == 5     # one call a request, edge and both limits in it
    assert client.post("/a").get_json()["layer"] == "route:a:day"
    # The window's three refusals took nothing from the shared bucket: 5 - 2 - this one.
    assert client.post("/b").headers["X-RateLimit-Remaining"] == "2"


def test_callable_cost_and_key(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    app, limiter = make_app(tmp_path, redis_url)

    @app.post("/w")
    @limiter.sliding_window("10 per day", key=lambda: request.headers["X-Team"],
                            cost=lambda: int(request.args["n"]))
    def w() -> dict[str, bool]:
        return {"ok": True}

    client = app.test_client()
    red = {"X-Team": "red"}
    assert [client.post(f"/w?n={n}", headers=red).status_code for n in (4, 4, 4, 2)] == \
        [200, 200, 429, 200]
    assert client.post("/w?n=10", headers={"X-Team": "blue"}).status_code == 200
    never = client.post("/w?n=11", headers={"X-Team": "green"})   # no wait makes it pass
    assert never.status_code == 400 and never.get_json()["code"] == "exceeds_limit"
    # Cost 0 only looks: it passes on a spent window and charges nothing.
    zero = client.post("/w?n=0", headers=red)
    assert zero.status_code == 200 and zero.headers["X-RateLimit-Remaining"] == "0"


def test_scope_shared_by_two_routes_per_key(tmp_path: Path, r: redis.Redis,
                                            redis_url: str) -> None:
    app, limiter = make_app(tmp_path, redis_url)
    team = lambda: request.headers["X-Team"]   # noqa: E731

    @app.post("/one")
    @limiter.sliding_window("3 per hour", key=team, scope="reports")
    def one() -> str:
        return "1"

    @app.post("/two")
    @limiter.sliding_window("3 per hour", key=team, scope="reports")
    def two() -> str:
        return "2"

    client = app.test_client()
    red, blue = {"headers": {"X-Team": "red"}}, {"headers": {"X-Team": "blue"}}
    assert codes(client, "/one", 2, **red) + codes(client, "/two", 2, **red) == [200, 200, 200, 429]
    assert client.post("/two", **red).get_json()["layer"] == "reports:hour"
    assert codes(client, "/two", 3, **blue) == [200, 200, 200]


def test_blueprint_wide_and_exempt(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    app, limiter = make_app(tmp_path, redis_url)
    bp = Blueprint("api", __name__)
    limiter.token_bucket(2, SLOW)(bp)

    @bp.post("/x")
    def x() -> str:
        return "x"

    @bp.post("/y")
    def y() -> str:
        return "y"

    @bp.post("/free")
    @limiter.sliding_window("1 per day")
    def free() -> str:
        return "free"

    limiter.exempt(free)
    app.register_blueprint(bp)
    client = app.test_client()
    assert codes(client, "/x", 3) == [200, 200, 429]
    assert codes(client, "/y", 3) == [200, 200, 429]   # each route its own bucket
    assert codes(client, "/free", 4) == [200] * 4


def test_with_the_plan_one_call_either_refusal_charges_nothing(tmp_path: Path, r: redis.Redis,
                                                                redis_url: str) -> None:
    app, limiter = make_app(tmp_path, redis_url)

    @app.post("/s")
    @limiter.sliding_window("2 per day", key="user")
    @limiter.plan(user=lambda: request.headers["X-User"])
    def s() -> str:
        return "s"

    @app.post("/plain")
    @limiter.plan(user=lambda: request.headers["X-User"])
    def plain() -> str:
        return "p"

    client = app.test_client()
    ann = {"headers": {"X-User": "ann"}}
    before = acquire_calls(r)
    assert codes(client, "/s", 4, **ann) == [200, 200, 429, 429]
    assert acquire_calls(r) - before == 4
    assert client.post("/s", **ann).get_json()["layer"] == "route:s:day"
    # The route's refusals took nothing from the plan's bucket of 3.
    assert codes(client, "/plain", 2, **ann) == [200, 429]
    bob = {"headers": {"X-User": "bob"}}
    assert codes(client, "/plain", 3, **bob) == [200, 200, 200]
    # The plan refuses bob now: his route window stays untouched.
    refused = client.post("/s", **bob)
    assert refused.status_code == 429 and refused.get_json()["layer"] == "user"
    assert '"route:s:day"' in refused.headers["RateLimit-Policy"]


def test_reserve_carries_the_route_limits(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    app, limiter = make_app(tmp_path, redis_url)

    @app.post("/llm")
    @limiter.sliding_window("2 per day", key="user", cost=1)
    def llm() -> str:
        with current_limiter().reserve(request.headers["X-User"], "echo", 10, 10) as spend:
            spend.settle(Usage(10, 5))
        return "done"

    limiter.plan()(llm)   # it charges itself (reserve): the route's limits join that call
    client = app.test_client()
    assert codes(client, "/llm", 1, headers={"X-User": "warm"}) == [200]   # scripts loaded
    before = acquire_calls(r)
    assert codes(client, "/llm", 3, headers={"X-User": "cy"}) == [200, 200, 429]
    # One acquire per request (the route's window in it), and one settle per admitted call
    # (it carries the spend ledger): 3 + 2.
    assert acquire_calls(r) - before == 5


def test_deduct_when(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    app, limiter = make_app(tmp_path, redis_url)

    @app.post("/d")
    @limiter.sliding_window("2 per day", deduct_when=lambda resp: resp.status_code < 400)
    @limiter.token_bucket(10, SLOW)
    def d() -> tuple[str, int]:
        return "d", 400 if request.args.get("bad") else 200

    client = app.test_client()
    assert codes(client, "/d?bad=1", 5) == [400] * 5     # given back: the window stays full
    assert codes(client, "/d", 3) == [200, 200, 429]
    # The bucket without deduct_when kept every charge but the refused one's: 10 - 5 - 2.
    last = client.post("/d?bad=1")
    assert last.status_code == 429 and '"route:d";r=3' in last.headers["RateLimit"]


def test_deduct_when_gives_back_a_shared_bucket(tmp_path: Path, r: redis.Redis,
                                               redis_url: str) -> None:
    """A bucket keyed by IP is shared with others (codec kind "B"); its deduct_when still
    finds the charge to give back."""
    app, limiter = make_app(tmp_path, redis_url)

    @app.post("/s")
    @limiter.token_bucket(2, SLOW, deduct_when=lambda resp: resp.status_code < 400)
    def s() -> tuple[str, int]:
        return "s", 400 if request.args.get("bad") else 200

    client = app.test_client()
    assert codes(client, "/s?bad=1", 4) == [400] * 4     # given back: the bucket stays full
    assert codes(client, "/s", 3) == [200, 200, 429]


def test_shadow_route_never_refuses(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    app, limiter = make_app(tmp_path, redis_url)

    @app.post("/sh")
    @limiter.sliding_window("2 per day", mode="shadow")
    def sh() -> str:
        return "sh"

    client = app.test_client()
    responses = [client.post("/sh") for _ in range(4)]
    assert [resp.status_code for resp in responses] == [200] * 4
    assert responses[-1].headers["X-RateLimit-Remaining"] == "0"


ROUTES = """
[routes."api.summarise"]
token_bucket = { burst = 2, per_second = 0.0001 }
quotas = ["3 per day"]
key = "header:X-Team"
cost = 1

[routes."api.report"]
quotas = ["4 per day"]
cost = 2
scope = "reports"
mode = "shadow"
"""


def test_toml_routes(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    app, _ = make_app(tmp_path, redis_url, ROUTES)
    bp = Blueprint("api", __name__)

    @bp.post("/summarise")
    def summarise() -> str:
        return "s"

    @bp.post("/report")
    def report() -> str:
        return "r"

    app.register_blueprint(bp)
    client = app.test_client()
    red = {"headers": {"X-Team": "red"}}
    assert codes(client, "/summarise", 3, **red) == [200, 200, 429]
    assert client.post("/summarise", **red).get_json()["layer"] == "route:api.summarise"
    assert codes(client, "/summarise", 2, headers={"X-Team": "blue"}) == [200, 200]
    shadow = [client.post("/report") for _ in range(4)]
    assert [resp.status_code for resp in shadow] == [200] * 4
    assert '"reports:day";q=4' in shadow[0].headers["RateLimit-Policy"]


@pytest.mark.parametrize(("table", "where"), [
    ('[routes."a.b"]\nquotas = ["3 per fortnight"]\n', 'routes."a.b".quotas[0]'),
    ('[routes."a.b"]\nquotas = ["3 per day"]\nkey = "cookie"\n', 'routes."a.b".key'),
    ('[routes."a.b"]\nquotas = ["3 per day"]\ncost = -1\n', 'routes."a.b".cost'),
    ('[routes."a.b"]\ntoken_bucket = { burst = 2 }\n', 'routes."a.b".token_bucket.per_second'),
    ('[routes."a.b"]\nquotas = ["3 per day"]\nmode = "dry"\n', 'routes."a.b".mode'),
    ('[routes."a.b"]\nscope = "x"\n', 'routes."a.b"'),
    ('[routes."a.b"]\nquotas = ["3 per day"]\ntypo = 1\n', 'routes."a.b".typo'),
])
def test_bad_route_tables_name_file_key_reason(table: str, where: str) -> None:
    import tomllib

    text = "[plans.free]\nburst = 1\nrefill_per_second = 1\n" + table
    with pytest.raises(PolicyError, match="^" + re.escape(f"limits.toml: {where}: ")):
        parse_policy(tomllib.loads(text), "limits.toml")


def test_decorator_arguments_are_checked_at_import() -> None:
    with pytest.raises(ValueError, match="key"):
        window_of("3 per day", key="cookie")
    with pytest.raises(ValueError, match="per day"):
        window_of("3 per fortnight")


def test_check_config_refuses_an_unknown_endpoint(tmp_path: Path, redis_url: str) -> None:
    app, _ = make_app(tmp_path, redis_url, '[routes."nowhere.view"]\nquotas = ["1 per day"]\n')
    result = app.test_cli_runner().invoke(args=["limits", "check-config",
                                                app.config["LIMITS_CONFIG"]])
    assert result.exit_code == 1 and 'routes."nowhere.view": no such endpoint' in result.output


def test_a_limit_keyed_by_org_is_shared_by_its_members(tmp_path: Path, r: redis.Redis,
                                                        redis_url: str) -> None:
    """key="org": the members of one org share the route's count; a user in no org counts
    alone (an org of one)."""
    orgs = ('[orgs."acme"]\nquotas = ["1000 per day"]\n'
            '[users]\n"ann" = { org = "acme" }\n"bob" = { org = "acme" }\n')
    app, limiter = make_app(tmp_path, redis_url, orgs)

    @app.post("/team")
    @limiter.sliding_window("3 per day", key="org")
    @limiter.plan(user=lambda: request.headers["X-User"])
    def team() -> str:
        return "ok"

    client = app.test_client()
    assert codes(client, "/team", 2, headers={"X-User": "ann"}) == [200, 200]
    assert codes(client, "/team", 2, headers={"X-User": "bob"}) == [200, 429]
    assert codes(client, "/team", 4, headers={"X-User": "cy"}) == [200, 200, 200, 429]

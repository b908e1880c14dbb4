"""GET /v1/usage for the caller; /admin/usage, a page an operator keeps open, and its JSON;
/admin/spend, who spent what per day (the spend ledger), as JSON or CSV.

The admin credential is ADMIN_TOKEN (Bearer, or HTTP Basic with the token as password, which
a browser asks for by itself), at least 32 characters (create_app refuses a shorter one).
Without ADMIN_TOKEN the admin pages are off. Ten failed credentials a minute from one client
IP, and that IP gets 429 with Retry-After until the window frees, whatever it presents.
"""

from __future__ import annotations

import csv
import hmac
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flask import Blueprint, Flask, Response, current_app, render_template, request
from werkzeug.exceptions import BadRequest, Forbidden, TooManyRequests, Unauthorized

from limiting import metrics
from limiting.core.decision import Decision
from limiting.core.naming import BODY_USER, KEY_USER, REALM_WORDS, wire_text
from limiting.core.policy_sections import valid_tag
from limiting.keys import presented_key
from limiting.ledger import Ledger, Spend, day_text, parse_day
from limiting.web.credentials import InvalidToken
from limiting.web.extension import current_limiter
from limiting.web.identity import client_ip

bp = Blueprint("usage", __name__, template_folder="templates")
MAX_USERS = 200
_DIGITS = re.compile(r"[0-9]{1,5}")              # bounded: int() of 5,000 digits is a ValueError
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# A cell a spreadsheet would read as a formula (OWASP's CSV injection list): = + - @, and tab
# or CR, which some programs skip before looking at the first character.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def layers_json(decision: Decision) -> list[dict[str, Any]]:
    # The pacing layer has no limit of its own to draw (it follows the provider's headers).
    return [{"layer": s.layer.name, "limit": s.layer.limit, "remaining": s.remaining,
             "reset": math.ceil(s.reset), "window": s.layer.window, "kind": s.layer.kind,
             "unit": s.layer.unit,
             "shadow": s.layer.shadow} for s in decision.states if s.layer.limit > 0]


def pacing_json(decision: Decision) -> dict[str, Any] | None:
    """What the provider's headers taught the guard: ``held`` (the pacing refuses now, for
    ``wait`` seconds), ``requests_left`` as of the provider's last word, ``reset`` (0: no
    fresh word). None: the model has no pacing (answered in this process)."""
    pace = next((s for s in decision.states if s.layer.unit == "pace"), None)
    if pace is None:
        return None
    held = decision.refused is not None and decision.refused.layer is pace.layer
    return {"held": held, "wait": math.ceil(decision.wait or 0) if held else 0,
            "requests_left": pace.remaining if pace.reset > 0 else None,
            "reset": math.ceil(pace.reset)}


@bp.get("/v1/usage")
def my_usage() -> dict[str, Any]:
    """The caller's own layers (API key from Authorization: Bearer or x-api-key). While the
    store is away the StoreUnavailable handler answers 503 limiter_unavailable."""
    limiter = current_limiter()
    try:
        record = limiter.authenticate(presented_key(request.headers))
    except InvalidToken as exc:
        raise Unauthorized(str(exc)) from None
    if record is None:
        raise Unauthorized("A valid API key is required.")
    plan = limiter.policy.resolve(record.user, record.plan)
    org = limiter.policy.org_of(record.user, record.org)
    decision = limiter.engine.peek(record.user, plan, org=org)
    layers = layers_json(decision)
    for table in limiter.engine.tag_tables(record.tags):   # shared with every key bearing it
        layers += layers_json(limiter.engine.peek_tag(table))
    out = {"user": record.user, "plan": plan.name, "org": org.name if org else None,
           "tags": list(record.tags), "layers": layers}
    if "days" in request.args:
        ledger = limiter.ledger
        days = ledger.days(_count("days", 7))
        realm = limiter.realm_of_user(record.user, anonymous=False)
        out["history"] = [s.json() for s in ledger.history(record.user, realm, days)]
    return out


def _count(name: str, default: int) -> int:
    """A day count or top-N from the query: 1 up to what the ledger keeps (plus today).
    ASCII digits only: ``str.isdigit`` takes "²" and "٣", which ``int`` then refuses or reads
    as a number the client never typed."""
    raw = request.args.get(name, str(default))
    most = current_limiter().policy.history_days + 1
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= 10_000:
        raise BadRequest(f"'{name}' must be a whole number from 1 (at most {most} days kept).")
    return min(int(raw), most) if name == "days" else int(raw)


def _day(ledger: Ledger) -> int:
    text = request.args.get("day")
    if not text:
        return ledger.today()
    try:   # fromisoformat alone also takes 20250101 and 2025-W01-1
        if not _DATE.fullmatch(text):
            raise ValueError(text)
        return parse_day(text)
    except ValueError:
        raise BadRequest("'day' must be a date, YYYY-MM-DD (UTC).") from None


def _wants_csv() -> bool:
    fmt = request.args.get("format")
    if fmt is not None:
        return fmt == "csv"
    best = request.accept_mimetypes.best_match(["application/json", "text/csv"])
    return best == "text/csv"


def _csv(name: str, head: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Response:
    buf = io.StringIO()
    # RFC 4180's CRLF: the writer then quotes any cell holding a CR or LF (with "\n" alone, a
    # user id holding a CR went out bare and split its row in two).
    writer = csv.DictWriter(buf, fieldnames=list(head), extrasaction="ignore",
                            lineterminator="\r\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return Response(buf.getvalue(), content_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})


def _cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, made inert by a leading ``'``
    (OWASP's rule; user ids, realms and key names are the client's or an operator's text).
    Numbers stay numbers: ours, never a client's text."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


SPEND_COLUMNS = ("day", "requests", "input_tokens", "cached_input_tokens", "output_tokens",
                 "tokens", "usd_micros", "usd")


@bp.get("/admin/spend")
def spend_top() -> Any:
    """The day's top spenders (``top``, by ``by`` = usd or tok, of one ``model``, of the keys
    bearing one ``tag``, or all), each with a sparkline of their last ``days``; the day's
    total per model; daily totals (with ``tag``: the tag's own)."""
    require_admin()
    limiter = current_limiter()
    ledger = limiter.ledger
    day, top, by = _day(ledger), _count("top", 20), _by()
    model = request.args.get("model") or None
    tag = request.args.get("tag") or None
    if tag is not None and not valid_tag(tag):
        raise BadRequest("'tag' must be a tag like project=search.")
    if tag is not None and model is not None:
        raise BadRequest("'tag' and 'model' are one at a time.")
    rows = ledger.top(day, top, model, by, tag)
    if _wants_csv():
        return _csv(f"spend-{day_text(day)}", ("user", "realm", "score", *SPEND_COLUMNS),
                    [row.json() for row in rows])
    spark = list(range(day - _count("days", 30) + 1, day + 1))
    models = [*limiter.policy.models, *limiter.policy.aliases, "echo"]
    if tag is not None:
        return {"day": day_text(day), "by": by, "tag": tag,
                "top": [row.json() for row in rows],
                "total": ledger.tag_totals(tag, [day])[0].json(),
                "daily": [s.json() for s in ledger.tag_totals(tag, spark)]}
    return {"day": day_text(day), "by": by, "model": model,
            "top": [{**row.json(), "spark": [s.usd_micros if by == "usd" else s.tokens
                                             for s in ledger.history(row.user, row.realm,
                                                                     spark)]}
                    for row in rows],
            "total": ledger.totals([day])[0].json(),
            "models": {name: s.json() for name, s in ledger.models(day, models).items()},
            "daily": [s.json() for s in ledger.totals(spark)]}


@bp.get("/admin/spend/user/<path:user>")
def spend_user(user: str) -> Any:
    """One user's last ``days``, in all and per API key (``realm``: u = the API key user,
    b = the /chat user_id; default: the key user when they hold a live key), and the ``top``
    end users they named on ``day`` (default today), by ``by`` (usd or tok)."""
    require_admin()
    limiter = current_limiter()
    ledger = limiter.ledger
    realm = request.args.get("realm") or limiter.realm_of_user(user)
    if realm not in (KEY_USER, BODY_USER):
        raise BadRequest("'realm' must be u (API key user) or b (/chat user_id).")
    days = ledger.days(_count("days", 30))
    day, top, by = _day(ledger), _count("top", 20), _by()
    history = ledger.history(user, realm, days)
    key_ids = [rec.key_id for rec in limiter.keys.list(user)] if realm == KEY_USER else []
    end_users = ledger.top_end_users(user, realm, day, top, by)
    if _wants_csv():
        return _csv(f"spend-{user}", ("user", "realm", "key_id", "end_user", *SPEND_COLUMNS),
                    [{"user": user, "realm": realm, "key_id": "", **s.json()}
                     for s in history]
                    + [{"user": user, "realm": realm, "key_id": kid, **s.json()}
                       for kid in key_ids for s in ledger.history(user, realm, days, kid)]
                    + [{"user": user, "realm": realm, "key_id": "",
                        "end_user": wire_text(row.end_user), **row.spend.json()}
                       for row in end_users])
    return {"user": user, "realm": realm, "days": [s.json() for s in history],
            "total": Spend.sum(history).json(),
            "keys": {kid: [s.json() for s in ledger.history(user, realm, days, kid)]
                     for kid in key_ids},
            "end_users": {"day": day_text(day), "by": by,
                          "top": [row.json() for row in end_users]}}


def _by() -> str:
    by = request.args.get("by", "usd")
    if by not in ("usd", "tok"):
        raise BadRequest("'by' must be usd or tok.")
    return by


def admin_token(app: Flask | None = None) -> str:
    """ADMIN_TOKEN from the app's config, else the environment ("" = admin pages off)."""
    config = (app or current_app).config
    return str(config.get("ADMIN_TOKEN") or os.environ.get("ADMIN_TOKEN", ""))


def require_admin() -> None:
    """The admin credential, with failures limited per client IP (these pages are exempt
    from the edge, so without it a token could be guessed at line speed)."""
    token = admin_token()
    if not token:
        raise Forbidden("Admin pages are off: set ADMIN_TOKEN to turn them on.")
    auth = request.authorization
    presented = ""
    if auth is not None:
        presented = (auth.token if auth.type == "bearer" else auth.password) or ""
    ok = hmac.compare_digest(presented.encode(), token.encode())
    wait = current_limiter().auth_failures.attempt(client_ip(), ok)
    if wait:
        raise TooManyAttempts(wait)
    if not ok:
        raise Unauthorized("The admin credential is required.",
                           www_authenticate=_basic_challenge())


class TooManyAttempts(TooManyRequests):
    """Too many failed credentials from this address: rendered by the HTTPException handler,
    which sends Retry-After along."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many failed credentials from this address; retry later.",
                         retry_after=retry_after)


def _basic_challenge() -> Any:
    from werkzeug.datastructures import WWWAuthenticate

    return WWWAuthenticate("basic", {"realm": "rate limiter admin"})


def known_users(key_plans: Mapping[str, str]) -> list[str]:
    """Users worth showing: the policy's [users], key holders, and any asked for by name."""
    limiter = current_limiter()
    asked = [u for u in request.args.get("users", "").split(",") if u]
    users = dict.fromkeys(asked + list(limiter.policy.users) + list(key_plans))
    return list(users)[:MAX_USERS]


@bp.get("/admin/usage.json")
def usage_json() -> dict[str, Any]:
    """Every known user's layers, on the plan of their newest live key (as their requests
    are served), and today's spenders in the namespace they spent in (``realm``: "key" or
    "anonymous", once per user and namespace); each org's and model's guard (with its
    pacing); refusals by layer since the counters started. While the store is away: 503
    limiter_unavailable, by the app's handler."""
    require_admin()
    limiter = current_limiter()
    key_plans = limiter.keys.plans_by_user()
    key_orgs = limiter.keys.orgs_by_user()
    counts = metrics.refusals()
    out: dict[str, Any] = {"users": [], "orgs": [], "models": [], "refusals": counts["layer"],
                           "would_refuse": counts["shadow"]}
    who = {(user, limiter.realm_of_user(user, key_plans)): None
           for user in known_users(key_plans)}
    if "users" not in request.args:     # a page asking for named users wants only those
        ledger, day = limiter.ledger, limiter.ledger.today()
        # By tokens too: a call to a free model (echo) ranks nowhere by dollars.
        who.update({(row.user, row.realm): None
                    for by in ("usd", "tok") for row in ledger.top(day, 50, by=by)})
    for user, realm in list(who)[:MAX_USERS]:
        plan = limiter.plan_of_user(user, key_plans, realm)
        org = limiter.org_of_user(user, key_orgs)
        out["users"].append({"user": user, "realm": REALM_WORDS.get(realm, realm),
                             "plan": plan.name, "org": org.name if org else None,
                             "layers": layers_json(limiter.engine.peek(user, plan, realm))})
    for name, org in limiter.policy.orgs.items():   # the key holders' (the org's own)
        out["orgs"].append({"org": name, "layers": layers_json(limiter.engine.peek_org(org))})
    out["tags"] = [{"tag": name, "layers": layers_json(limiter.engine.peek_tag(tag))}
                   for name, tag in limiter.policy.tags.items()]
    for model in limiter.policy.models:
        decision = limiter.engine.peek_model(model)
        out["models"].append({"model": model, "layers": layers_json(decision),
                              "pacing": pacing_json(decision),
                              "refusals": counts["model"].get(model, 0)})
    return out


@bp.get("/admin/usage")
def usage_page() -> Response:
    require_admin()
    return Response(render_template("usage.html"), content_type="text/html; charset=utf-8")

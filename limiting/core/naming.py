"""Redis-safe names for users and models (every key a subject owns shares one prefix and one
hash tag, so one script on one Cluster slot sees them all), and the edge's per-IP keys.

User ids come from request bodies and API keys, so they are hostile input: a brace would
move a key to another Cluster slot, a separator could collide with another user's key.
"""

from __future__ import annotations

import hashlib
import json
import re

from .codec import Realm
from .layers import Layer, edge
from .policy import FailMode

MAX_USER_ID_LENGTH = 256
# No ':' here, so a plain id can never look like the hashed form "h:<hex>".
_PLAIN = re.compile(r"[A-Za-z0-9._@+=-]{1,64}")


def user_tag(user_id: str) -> str:
    """The part of a Redis key that names one user, safe for keys and hash tags."""
    if _PLAIN.fullmatch(user_id):
        return user_id
    return "h:" + digest(user_id)


# Who a user id belongs to. An API key's user and a /chat body's user_id never share keys:
# anyone can type a body user_id, so it must not spend a key holder's limits.
KEY_USER: str = Realm.KEY_USER   # typed str: callers key dicts by either
BODY_USER: str = Realm.BODY_USER


# The realms in words, for people (the usage page, alert events): never the letters.
REALM_WORDS = {KEY_USER: "key", BODY_USER: "anonymous"}


def user_prefix(namespace: str, user_id: str, realm: str = KEY_USER) -> str:
    """Every key of one user shares this prefix and its hash tag, so one script sees them all."""
    return f"{namespace}{{{realm}:{user_tag(user_id)}}}:"


def end_user_prefix(namespace: str, holder: str, realm: str, end_user: str) -> str:
    """Every key of one end user of one key holder, under a hash tag of their own (end users
    spread over a Cluster's slots). Always digested, with the holder and its realm: the id is
    the holder's client's text, and another holder's "alice" must be another subject."""
    pair = json.dumps([realm, holder, end_user])   # one text per triple: no separator to forge
    return f"{namespace}{{e:{digest(pair)}}}:"


def org_prefix(namespace: str, org: str, realm: str = KEY_USER) -> str:
    """Every key of one org, under its own hash tag. The members' realm picks one of two
    sets: /chat body user_ids (anyone can type one) never spend key holders' org limits."""
    return user_prefix(namespace, org, Realm(realm).org)


def tag_prefix(namespace: str, tag: str) -> str:
    """Every key of one tag's limits, under its own hash tag (one Cluster slot per tag). Only
    API keys bear tags, so there is one set, never a /chat body's ("t" is no Realm's letter)."""
    return f"{namespace}{{t:{user_tag(tag)}}}:"


class EdgeKeys:
    """Flask-Limiter's own keys for the per-IP application limits, so both count as one."""

    def __init__(self, texts: tuple[str, ...], prefix: str = "edge") -> None:
        from limits import parse

        self._items = [parse(text) for text in texts]
        # key_for() joins its parts on every call; only the IP in the middle ever changes.
        self._parts: list[tuple[str, str]] = []
        for item in self._items:
            head, tail = item.key_for(prefix, "\x00", "global").split("\x00")
            self._parts.append(("LIMITS:" + head, tail))

    def layers(self, fail: FailMode) -> tuple[Layer, ...]:
        return tuple(edge(item.get_expiry(), item.amount, fail) for item in self._items)

    def __call__(self, ip: str) -> list[str]:
        return [head + ip + tail for head, tail in self._parts]


# --- hostile text, made safe one way for every caller ---------------------------------------------


def digest(text: str, length: int = 40) -> str:
    """A fixed stand-in for text that must not be stored or shown as it is (an id too odd
    for a key, a secret): hex sha256 of its UTF-8, any lone surrogate taken as it is, so
    every str has one and no two share it by accident."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def wire_text(text: str) -> str:
    """``text`` as a store takes it (valid UTF-8) and a person can still read it: a lone
    surrogate (from argv or a JSON body) is spelled out as ``\\udXXX``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")

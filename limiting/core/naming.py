"""Redis-safe names for users and models: every key a subject owns shares one prefix and one
hash tag, so one script (on one Cluster slot) sees them all.

User ids come from request bodies and API keys, so they are hostile input: a brace would
move a key to another Cluster slot, a separator could collide with another user's key.
"""

from __future__ import annotations

import hashlib
import re

MAX_USER_ID_LENGTH = 256
# No ':' here, so a plain id can never look like the hashed form "h:<hex>".
_PLAIN = re.compile(r"[A-Za-z0-9._@+=-]{1,64}")


def user_tag(user_id: str) -> str:
    """The part of a Redis key that names one user, safe for keys and hash tags."""
    if _PLAIN.fullmatch(user_id):
        return user_id
    return "h:" + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


# Who a user id belongs to. An API key's user ("u") and a /chat body's user_id ("b") never
# share keys: anyone can type a body user_id, so it must not spend a key holder's limits.
KEY_USER = "u"
BODY_USER = "b"


def user_prefix(namespace: str, user_id: str, realm: str = KEY_USER) -> str:
    """Every key of one user shares this prefix and its hash tag, so one script sees them all."""
    return f"{namespace}{{{realm}:{user_tag(user_id)}}}:"

"""API keys: who is calling /v1, and on which plan, without the store ever holding a secret.

A key is ``llm_`` + 43 url-safe characters from ``secrets`` (256 bits). Only its sha256 is
stored. The record lives at ``<ns>key:{<sha256hex>}`` (a hash; the hash tag is the digest, so
every record is one Cluster slot of its own and every command touches one key), and
``<ns>keys:index`` maps key_id -> digest for listing and revoking by id.

A key may bear tags (``project=search``, core/policy_sections.py valid_tag), set when it is
made and kept for its life: its requests meet each tag's ``[tags."..."]`` limits, shared by
every key bearing the tag, and the ledger counts its spend per tag. Tags come only from this
record, never from a request, so a client cannot step out of them.

memory:// keeps the same records in this process: a ``flask keys`` command then only reaches
its own process, so memory:// keys are for tests and single-process dev servers.
"""

from __future__ import annotations

import builtins
import hmac
import re
import secrets
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .core.naming import MAX_USER_ID_LENGTH
from .core.naming import digest as text_digest
from .core.policy_sections import valid_tag

if TYPE_CHECKING:
    from werkzeug.datastructures import Headers

    from .stores.store import Store

KEY_PREFIX = "llm_"
KEY_ID_LENGTH = 12
MAX_PRESENTED_LENGTH = 200
MAX_NAME_LENGTH = 256
MAX_TAGS = 16   # each is a group of layers in the key's every call, when it has a table
_KEY_CHARS = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What an operator may see about a key: never the key itself nor its hash."""

    key_id: str
    user: str
    plan: str
    name: str | None
    created_at: int
    revoked: bool
    org: str | None = None    # the org its requests are charged to (None: the user's own)
    tags: tuple[str, ...] = ()   # "name=value" each, sorted; set at creation only


def new_key() -> str:
    """A fresh secret: 32 random bytes, url-safe base64 (43 characters), after the prefix.

    Its id (the 12 characters after the prefix) never starts with "-": a shell command line
    would read ``flask keys revoke -Xy...`` as an option (1 key in 64 drew one; the draw
    again keeps every key equally likely among the rest)."""
    while True:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        if key[len(KEY_PREFIX)] != "-":
            return key


def digest(key: str) -> str:
    # A fast hash is right here: keys are 256 random bits, so there is nothing to brute-force
    # and no need for a slow password hash (bcrypt/argon2) on the hot path of every request.
    return text_digest(key, 64)


def well_formed(presented: object) -> bool:
    """Cheap shape check, so garbage never costs a store round trip."""
    return (
        isinstance(presented, str)
        and len(presented) <= MAX_PRESENTED_LENGTH
        and presented.startswith(KEY_PREFIX)
        and _KEY_CHARS.fullmatch(presented, len(KEY_PREFIX)) is not None
    )


def bearer_token(header_value: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme case-insensitive), else None."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def presented_key(headers: Headers) -> str | None:
    """The key a request presents: ``Authorization: Bearer``, else ``X-API-Key`` (werkzeug's
    headers: names compare case-insensitively)."""
    return bearer_token(headers.get("Authorization")) or headers.get("X-API-Key") or None


class ApiKeys:
    """Create, authenticate, list and revoke API keys in the limiter's store."""

    def __init__(self, store: Store, default_plan: str, plans: Collection[str],
                 namespace: str = "rl:", *, orgs: Collection[str] = ()) -> None:
        self.default_plan = default_plan
        self.plans = tuple(plans)
        self.orgs = tuple(orgs)
        self.namespace = namespace
        self.index_key = f"{namespace}keys:index"
        # Any Store: memory:// keeps the same records in this process (the CLI and each
        # request build their own ApiKeys on the one store).
        self.store = store

    def record_key(self, hexdigest: str) -> str:
        """The record's Redis key; the digest is the hash tag, so one key per slot."""
        return f"{self.namespace}key:{{{hexdigest}}}"

    def create(self, user: str, plan: str | None = None, name: str | None = None,
               org: str | None = None, tags: Iterable[str] = ()) -> tuple[str, KeyRecord]:
        """A new key for ``user`` (charged to ``org`` too, if given, whatever [users] says;
        bearing ``tags``, "name=value" each); the secret is returned once and never stored."""
        if not user or not user.strip() or len(user) > MAX_USER_ID_LENGTH:
            raise ValueError(f"user id must be 1..{MAX_USER_ID_LENGTH} characters, not blank")
        plan = self.default_plan if plan is None else plan
        if plan not in self.plans:
            raise ValueError(f"unknown plan {plan!r}; valid plans: {', '.join(self.plans)}")
        if org is not None and org not in self.orgs:
            valid = ", ".join(self.orgs) or "none under [orgs]"
            raise ValueError(f"unknown org {org!r}; valid orgs: {valid}")
        if name is not None and len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"key name must be at most {MAX_NAME_LENGTH} characters")
        borne = checked_tags(tags)
        while True:
            key = new_key()
            hexd = digest(key)
            record = KeyRecord(key[len(KEY_PREFIX):][:KEY_ID_LENGTH], user, plan, name,
                               int(time.time()), False, org, borne)
            fields = {"hash": hexd, "key_id": record.key_id, "user": user, "plan": plan,
                      "created_at": str(record.created_at)}
            if name is not None:
                fields["name"] = name
            if org is not None:
                fields["org"] = org
            if borne:
                fields["tags"] = ",".join(borne)   # a tag holds no ","
            # Claim the key_id first: a (72-bit, so theoretical) clash draws a new key instead
            # of leaving a record that no key_id reaches and so could never be revoked by id.
            if self._claim(record.key_id, hexd, fields):
                return key, record

    def authenticate(self, presented: str | None) -> KeyRecord | None:
        """The live record of a presented key, or None; one store round trip at most."""
        if presented is None or not well_formed(presented):
            return None
        hexd = digest(presented)
        fields = self._fetch(hexd)
        stored = fields.get("hash", "")
        # The lookup was by digest already; compare in constant time anyway so nothing
        # about the stored value leaks through timing.
        if not hmac.compare_digest(stored.encode(), hexd.encode()):
            return None
        record = _record(fields)
        if record is None or record.revoked:
            return None
        return record

    def list(self, user: str | None = None) -> builtins.list[KeyRecord]:
        """Every key (revoked ones too, flagged), optionally of one user, oldest first."""
        index = self.store.hashes([self.index_key])[0]
        rows = self.store.hashes([self.record_key(h) for h in index.values()])
        records = [rec for rec in map(_record, rows) if rec is not None]
        if user is not None:
            records = [rec for rec in records if rec.user == user]
        return sorted(records, key=lambda rec: (rec.created_at, rec.key_id))

    def plans_by_user(self, user: str | None = None) -> dict[str, str]:
        """user -> the plan of their newest live key (revoked keys serve no one)."""
        return {rec.user: rec.plan for rec in self.list(user) if not rec.revoked}

    def orgs_by_user(self, user: str | None = None) -> dict[str, str | None]:
        """user -> the org of their newest live key (None: the key names none)."""
        return {rec.user: rec.org for rec in self.list(user) if not rec.revoked}

    def revoke(self, key_id_or_key: str) -> int:
        """Revoke by key_id or full key; how many live keys this revoked (0 or 1)."""
        if len(key_id_or_key) == KEY_ID_LENGTH and _KEY_CHARS.fullmatch(key_id_or_key):
            hexd = self._digest_of(key_id_or_key)
        elif well_formed(key_id_or_key):
            hexd = digest(key_id_or_key)
        else:
            return 0
        if hexd is None:
            return 0
        rkey = self.record_key(hexd)
        if self.store.hash_fields(rkey, ["hash"])[0] is None:
            return 0
        # Write-once: a second revoke reports 0, and the first time stays.
        return int(self.store.hash_claim(rkey, "revoked", str(int(time.time()))))

    def _claim(self, key_id: str, hexd: str, fields: Mapping[str, str]) -> bool:
        if not self.store.hash_claim(self.index_key, key_id, hexd):
            return False
        self.store.hash_set(self.record_key(hexd), fields)
        return True

    def _fetch(self, hexd: str) -> dict[str, str]:
        return self.store.record(self.record_key(hexd))

    def _digest_of(self, key_id: str) -> str | None:
        return self.store.hash_fields(self.index_key, [key_id])[0]


def checked_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """``tags`` as a key bears them: each well-formed, no name twice, sorted; ValueError
    naming the first that is not."""
    out: dict[str, str] = {}
    for tag in tags:
        if not isinstance(tag, str) or not valid_tag(tag):
            raise ValueError(f"bad tag {tag!r}: a tag is name=value (name: letters, digits, "
                             "_ . -, up to 64; value: also : /, up to 128)")
        name = tag.partition("=")[0]
        if out.get(name, tag) != tag:
            raise ValueError(f"tag {name!r} given twice ({out[name]!r}, {tag!r})")
        out[name] = tag
    if len(out) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags on a key")
    return tuple(sorted(out.values()))


def _record(fields: Mapping[str, str]) -> KeyRecord | None:
    """A record from stored fields; None for a partial or damaged one (a damaged tag too:
    a key whose tags cannot be read serves no one rather than serving without them)."""
    try:
        stored = fields.get("tags")
        return KeyRecord(
            key_id=fields["key_id"], user=fields["user"], plan=fields["plan"],
            name=fields.get("name"), created_at=int(fields["created_at"]),
            revoked="revoked" in fields, org=fields.get("org"),
            tags=checked_tags(stored.split(",")) if stored else (),
        )
    except (KeyError, ValueError):
        return None

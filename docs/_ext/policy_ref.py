"""The policy file's reference, read off the policy reader itself so that it cannot drift.

Its source is docs/policy-reference.toml: one policy that sets every key, each with its meaning
in the comment above or beside it. Reading that file through the real reader
(``limiting.core.policy.parse_policy``) with every ``TableReader`` read recorded gives each
key's table, type and default as the code has them. A key the reader reads that has no meaning
there, or a key of the file the reader rejects, is a problem: the docs build (``make docs``)
and tests/test_docs.py refuse both. A scan of the reader's source for the keys it asks for
catches a new key that the file does not set at all.

No Sphinx import here: the test suite runs this without the docs' dependencies.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limiting.core.policy import parse_policy
from limiting.core.policy_reader import TableReader

EXAMPLE = Path(__file__).resolve().parent.parent / "policy-reference.toml"
READER_SOURCES = Path(__file__).resolve().parents[2] / "limiting"

# TableReader's typed reads: every one the reader makes goes through one of these.
READS = ("get", "positive", "seconds", "price", "multipliers", "fail_mode", "mode", "windows")
# Tables whose second part is a name the operator picks, shown as a placeholder.
NAMED = {"plans": "<plan>", "orgs": "<org>", "models": "<model>", "tags": "<tag>",
         "routes": "<endpoint>", "users": "<user>"}
# Tables whose own keys are data (user ids), not settings.
DATA_TABLES = {"users"}
_KINDS = {int: "integer", float: "number", str: "string", list: "list", dict: "table",
          bool: "true or false"}


@dataclass
class Key:
    """One setting: where it lives, what the reader takes, and what it means."""

    table: str
    key: str
    type: str = ""
    default: str = ""
    meaning: str = ""


@dataclass(frozen=True)
class Read:
    table: str
    key: str
    type: str
    default: str


def segments(path: str) -> list[str]:
    """``models."gpt-4o".reserve`` -> ["models", "gpt-4o", "reserve"] (quotes keep dots)."""
    return [a or b for a, b in re.findall(r'"([^"]*)"|([^.\s"]+)', path)]


def normal(path: str) -> str:
    """A table path with the operator's names replaced: ``plans.starter`` -> ``plans.<plan>``."""
    parts = segments(path)
    if len(parts) > 1 and parts[0] in NAMED:
        parts[1] = NAMED[parts[0]]
    return ".".join(parts)


def _kind(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "number"
    return " or ".join(_KINDS.get(k, getattr(k, "__name__", str(k))) for k in kinds)


def _value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if value not in ([], {}) else ("[]" if value == [] else "{}")


def _describe(method: str, args: dict[str, Any]) -> tuple[str, str, str]:
    """(key, type, default) of one recorded read, in the words of the reference."""
    key = args.get("key", "mode")
    default = "required" if args.get("required") else _value(args.get("default"))
    if method == "get":
        return key, _kind(args["kind"]), default
    if method == "positive":
        return key, f"{_kind(args['kind'])} > 0", default
    if method == "seconds":
        return key, f"seconds, 0 to {args['ceiling']:g}", "0"
    if method == "price":
        return key, "number ≥ 0 (USD)", "unset"
    if method == "multipliers":
        return key, "table of name = number > 0", "{}"
    if method == "fail_mode":
        return key, '"fail_open" or "fail_closed"', default
    if method == "mode":
        return key, '"enforce" or "shadow"', '"enforce"'
    return key, 'list of "N per unit"', "[]"   # windows


@contextmanager
def recording() -> Iterator[list[Read]]:
    """Record every key a TableReader reads while the block runs (the outermost read of
    one key only: ``positive`` reads through ``get``)."""
    reads: list[Read] = []
    depth = [0]
    originals = {name: getattr(TableReader, name) for name in READS}

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def recorded(self: TableReader, *args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0:
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                key, kind, default = _describe(name, dict(bound.arguments))
                reads.append(Read(normal(self.prefix), key, kind, default))
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return recorded

    for name, original in originals.items():
        setattr(TableReader, name, wrap(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(TableReader, name, original)


_HEADER = re.compile(r"^\[([^\]]+)\]\s*(?:#\s?(.*))?$")
_ASSIGN = re.compile(r'^("[^"]+"|[A-Za-z0-9_-]+)\s*=\s*(.*?)\s*(?:\s#\s?(.*))?$')
# "[default: the first plan under [plans]] ...": one level of brackets inside.
_OVERRIDE = re.compile(r"^\[(type|default):\s*((?:[^\[\]]|\[[^\]]*\])+)\]\s*")
# An org takes a plan's keys, meaning the same: shared by its members instead.
INHERITS = {"orgs.<org>": "plans.<plan>", "tags.<tag>": "plans.<plan>",
            "plans.<plan>.end_user": "plans.<plan>"}


def documented(text: str) -> dict[tuple[str, str], Key]:
    """(table, key) -> Key with the meaning the example's comments give it, in file order.

    A comment block right above a key (or its trailing comment) is the key's meaning; the block
    above a ``[table]`` header is the meaning of that table's key in its parent. A meaning may
    start with ``[type: ...]`` or ``[default: ...]`` where the reader's own words mislead."""
    found: dict[tuple[str, str], Key] = {}
    table, block = "", []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            block = []
            continue
        header = _HEADER.match(stripped)
        if header:
            table = normal(header[1])
            parts = segments(table)
            if len(parts) > 1 and parts[0] in NAMED and len(parts) == 2:
                parts = parts[:1]   # [plans.<plan>] documents the top level's "plans"
            where = (".".join(parts[:-1]), parts[-1])
            meaning = " ".join([*block, header[2] or ""]).strip()
        else:
            assign = _ASSIGN.match(stripped)
            if assign is None or table in DATA_TABLES:
                block = []
                continue
            where = (table, assign[1].strip('"'))
            meaning = " ".join([*block, assign[3] or ""]).strip()
        block = []
        key = found.setdefault(where, Key(*where))
        if meaning and not key.meaning:
            key.meaning = meaning
    return found


def keys(example: Path = EXAMPLE) -> tuple[list[Key], list[str]]:
    """Every setting the reader reads, with its meaning, in the example's order; and the
    problems (each a sentence) that make the reference wrong."""
    text = example.read_text(encoding="utf-8")
    meanings = documented(text)
    problems: list[str] = []
    with recording() as reads:
        try:
            parse_policy(tomllib.loads(text), example.name)
        except ValueError as exc:   # PolicyError: the example sets a key the reader refuses
            problems.append(f"the reader refuses the example: {exc}")
    out: dict[tuple[str, str], Key] = {}
    for read in reads:
        where = (read.table, read.key)
        if where in out:
            continue
        key = meanings.get(where) or Key(*where)
        parent = meanings.get((INHERITS.get(read.table, ""), read.key))
        if not key.meaning and read.table in INHERITS and parent is not None:
            key.meaning = parent.meaning
        if not key.meaning:
            problems.append(f"{example.name}: [{read.table or 'top level'}] {read.key}: the "
                            "reader reads it, but the example gives no meaning (a comment)")
        key.type, key.default = read.type, read.default
        while (override := _OVERRIDE.match(key.meaning)) is not None:
            setattr(key, override[1], override[2].strip())
            key.meaning = key.meaning[override.end():]
        key.meaning = key.meaning.strip()
        out[where] = key
    order = {where: i for i, where in enumerate(meanings)}
    tables = {k.table: order.get(("", segments(k.table)[0]) if k.table else ("", k.key),
                                 len(order)) for k in out.values()}

    def rank(k: Key) -> tuple[int, int, int]:
        own = order.get((INHERITS.get(k.table, k.table), k.key))
        if own is None:
            own = order.get((k.table, k.key))
        return (tables[k.table] if k.table else -1, len(segments(k.table)),
                len(order) if own is None else own)

    ranked = sorted(out.values(), key=rank)
    named = {k.key for k in ranked}
    for name in sorted(asked_for() - named):
        problems.append(f"the reader asks for {name!r} (limiting/), but "
                        f"{example.name} never sets it: add it with its meaning")
    return ranked, problems


def asked_for(root: Path = READER_SOURCES) -> set[str]:
    """Every key a TableReader read names in limiting/ (a literal first argument)."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        if "TableReader" not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in READS):
                continue
            if node.func.attr == "mode" and not node.args:
                names.add("mode")
            elif node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) and _typed(node):
                names.add(node.args[0].value)
    return names


def _typed(node: ast.Call) -> bool:
    """A ``get`` names its type (``r.get("plan", str)``): a dict's ``get`` does not."""
    if node.func.attr != "get":   # type: ignore[attr-defined]
        return True
    if len(node.args) < 2:
        return False
    kind = node.args[1]
    items = kind.elts if isinstance(kind, ast.Tuple) else [kind]
    return all(isinstance(i, ast.Name) and i.id in {"int", "float", "str", "list", "dict",
                                                     "bool"} for i in items)

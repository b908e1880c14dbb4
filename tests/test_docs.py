"""The documentation cannot drift from the code: the policy-file reference is read off the
policy reader (docs/_ext/policy_ref.py), and README's relative links point at files that exist.

`make docs` runs the same checks inside the Sphinx build; these run in `make test`, without
Sphinx installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import policy_ref  # noqa: E402
import readme_links  # noqa: E402


def test_the_policy_reference_documents_every_key_the_reader_takes() -> None:
    keys, problems = policy_ref.keys()
    assert problems == []
    # Each key has a type, a default and a meaning, and the big tables are all there.
    assert all(k.type and k.default and k.meaning for k in keys)
    tables = {k.table for k in keys}
    assert {"", "edge", "defaults", "plans.<plan>", "orgs.<org>", "users.<user>",
            "models.<model>", "store", "routes.<endpoint>"} <= tables


def test_a_key_without_a_meaning_is_a_problem(tmp_path: Path) -> None:
    text = policy_ref.EXAMPLE.read_text(encoding="utf-8")
    undocumented = text.replace("history_days = 35                  # Days the spend ledger "
                                "keeps.", "history_days = 35")
    assert undocumented != text
    example = tmp_path / "policy.toml"
    example.write_text(undocumented, encoding="utf-8")
    _, problems = policy_ref.keys(example)
    assert problems == ["policy.toml: [store] history_days: the reader reads it, but the "
                        "example gives no meaning (a comment)"]


def test_a_key_the_reader_refuses_is_a_problem(tmp_path: Path) -> None:
    text = policy_ref.EXAMPLE.read_text(encoding="utf-8")
    example = tmp_path / "policy.toml"
    example.write_text(text.replace("[store]\n", "[store]\nspeed = 3   # Not a key.\n"),
                       encoding="utf-8")
    _, problems = policy_ref.keys(example)
    assert any("refuses the example" in p and "store.speed: unknown key" in p
               for p in problems)


def test_a_key_the_example_never_sets_is_a_problem(tmp_path: Path) -> None:
    """The reader's source is scanned too: a new key read only in some branch of the reader
    (never by the example) still shows up."""
    text = policy_ref.EXAMPLE.read_text(encoding="utf-8")
    example = tmp_path / "policy.toml"
    # Without routes' token_bucket table (and its fail_rate) the reader never reads
    # per_second: only the scan of its source knows the key.
    cut = text[:text.index("# A token bucket on the route")]
    cut = "\n".join(line for line in cut.splitlines() if "the token bucket does" not in line)
    example.write_text(cut, encoding="utf-8")
    _, problems = policy_ref.keys(example)
    assert "the reader asks for 'per_second' (limiting/), but policy.toml never sets it: add " \
        "it with its meaning" in problems


def test_the_reader_scan_sees_keys_of_every_reader_module() -> None:
    asked = policy_ref.asked_for()
    # policy.py, routes.py, members.py and capacity.py each read some.
    assert {"burst", "per_second", "org", "shards", "reserve", "mode", "per_ip"} <= asked


def test_readme_links_resolve() -> None:
    assert readme_links.broken(ROOT / "README.md") == []


@pytest.mark.parametrize("link", ["[guide](docs/nowhere.md)", "![img](docs/gone.png)",
                                  "[x](missing/file.txt#part)"])
def test_a_broken_readme_link_is_found(tmp_path: Path, link: str) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\n[ok](README.md) [web](https://example.org) [top](#t)\n{link}\n"
                      "```\n[in code](not/checked.md)\n```\n", encoding="utf-8")
    assert readme_links.broken(readme) == [f"README.md:4: {link.split('(')[1][:-1]}: "
                                           "no such file"]

"""README.md's relative links and images must point at files that exist: it is the front page
that links into the site, and a link that breaks when a file moves is found here, not by a
reader. ``python docs/_ext/readme_links.py README.md`` exits 1 naming each broken link."""

from __future__ import annotations

import re
import sys
from pathlib import Path

# [text](target) and ![alt](target), targets without spaces; an optional "title" after.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def broken(readme: Path) -> list[str]:
    """Each relative link of ``readme`` (outside code blocks) whose file does not exist."""
    problems, fenced = [], False
    for number, line in enumerate(readme.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue   # a URL, mailto:, or an anchor in this file
            path = target.split("#", 1)[0]
            if not (readme.parent / path).exists():
                problems.append(f"{readme.name}:{number}: {target}: no such file")
    return problems


if __name__ == "__main__":
    found = [p for name in sys.argv[1:] for p in broken(Path(name))]
    print("\n".join(found) or f"{', '.join(sys.argv[1:])}: every relative link resolves")
    sys.exit(1 if found else 0)

"""The house rules: limiting/core imports neither Flask nor redis (nor werkzeug, Flask-Limiter
or gevent), directly or through another limiting module; blueprints import only the public
limiting package."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

FORBIDDEN = ("flask", "werkzeug", "flask_limiter", "redis", "gevent")
CORE = ROOT / "limiting" / "core"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved within limiting.core."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add(node.module or "")
            else:
                base = ["limiting", "core"][: 3 - node.level]
                found.add(".".join(base + ([node.module] if node.module else [])))
    return found


def test_the_core_imports_neither_flask_nor_redis() -> None:
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) > 5
    for path in modules:
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {name}"
            if name.startswith("limiting.") and not name.startswith("limiting.core"):
                raise AssertionError(f"{path.name} imports {name}, outside the core")


def test_blueprints_use_only_the_public_limiting_package() -> None:
    """The HTTP faces see one public API (limiting/__init__), so the library's inside can
    move without breaking them."""
    for path in sorted((ROOT / "blueprints").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("limiting."), \
                    f"{path.name} imports {node.module}; import it from limiting"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("limiting.") for a in node.names), path.name

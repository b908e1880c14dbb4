"""The house rules: limiting/core imports neither Flask nor redis (nor werkzeug, Flask-Limiter
or gevent), directly or through another limiting module; the engine never imports the HTTP
faces; every module has one import name."""

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


def test_the_engine_never_imports_the_http_faces() -> None:
    """The library's layers stand without its blueprints: an app may register none of them."""
    faces = ("limiting.blueprints", "limiting.providers")
    for folder in ("core", "stores", "web"):
        for path in sorted((ROOT / "limiting" / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                assert not any(n.startswith(faces) for n in names), f"{path} imports {names}"


def test_every_module_has_one_import_name() -> None:
    """Installed, only ``limiting`` exists: nothing may import the library by another name."""
    others = ("providers", "fakeprovider.providers")
    for path in sorted(ROOT.glob("**/*.py")):
        # The adopter app has its own blueprints and providers packages, on purpose.
        if {".venv", "docs", "adopter_app"} & set(path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top = node.module.split(".")[0]
                assert top not in others, f"{path}: from {node.module}"
                if top == "blueprints":
                    assert path.name == "app.py", f"{path}: use limiting.blueprints"

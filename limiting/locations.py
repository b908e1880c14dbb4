"""Where an app's policy and instance folder are, worked out the same way by the extension
(which has the app) and by gunicorn's master (which must not import it).

The master cannot import the app: that imports Flask and ssl before gevent patches the workers.
So the app's root and instance folders come from its module's import spec, by Flask's own rules
(``Flask.root_path``, ``Flask.auto_find_instance_path``); a test keeps the two in step.
Standard library only.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path, PurePath

# The policy an app gets when it names none and has no limits.toml: the source article's
# numbers. This repository's own limits.toml is a link to it (one copy of the text).
BUILT_IN_POLICY = Path(__file__).resolve().with_name("default_limits.toml")
POLICY_FILE = "limits.toml"


def policy_path(named: str | None, root: Path) -> tuple[Path, bool]:
    """The policy file to read and whether it was named (LIMITS_CONFIG): a named file must
    exist; else ``limits.toml`` in the app's root, else the built-in policy."""
    if named:
        return Path(named), True
    local = root / POLICY_FILE
    if local.is_file():
        return local, False
    return BUILT_IN_POLICY, False


def instance_override() -> Path | None:
    """LIMITER_INSTANCE: the folder of the embedded store and the kept policy, whatever the
    app's own instance folder is."""
    named = os.environ.get("LIMITER_INSTANCE")
    return Path(named).resolve() if named else None


def module_folders(module: str) -> tuple[Path, Path]:
    """(root, instance) of ``Flask(module)``: the folder its module is in (a package's own
    folder), and ``instance/`` beside the top package, or ``<prefix>/var/<module>-instance``
    when it is installed. The module is found, not imported (its parents are not either)."""
    top = _spec(module.partition(".")[0])
    if top is None:
        cwd = Path.cwd()
        return cwd, cwd / "instance"
    spec = _spec(module) or top
    root = _folder_of(spec)
    if top.submodule_search_locations and top.origin not in (None, "namespace"):
        package_path = Path(top.origin).parent.parent
    elif top.submodule_search_locations:
        package_path = Path(next(iter(top.submodule_search_locations))).parent
    else:
        package_path = Path(top.origin).parent           # type: ignore[arg-type]
    prefix = _installed_prefix(package_path)
    if prefix is None:
        return root, package_path / "instance"
    return root, prefix / "var" / f"{module}-instance"


def _spec(name: str) -> ModuleSpec | None:
    """The spec of ``name`` by walking the path finders part by part: importlib.util.find_spec
    would import the parent packages (and run their __init__)."""
    path: list[str] | None = None
    spec = None
    for part in name.split("."):
        spec = PathFinder.find_spec(part, path)
        if spec is None:
            return None
        path = list(spec.submodule_search_locations or [])
    return spec


def _folder_of(spec: ModuleSpec) -> Path:
    if spec.origin not in (None, "namespace"):
        return Path(os.path.abspath(spec.origin)).parent
    return Path(os.path.abspath(next(iter(spec.submodule_search_locations or [os.getcwd()]))))


def _installed_prefix(package_path: Path) -> Path | None:
    """Flask's find_package: the prefix of a system or virtualenv install, None if the app
    is a folder of its own."""
    prefix = Path(os.path.abspath(sys.prefix))
    if PurePath(package_path).is_relative_to(prefix):
        return prefix
    if package_path.name.lower() == "site-packages":
        parent = package_path.parent
        if parent.name.lower() == "lib":
            return parent.parent
        if parent.parent.name.lower() == "lib":
            return parent.parent.parent
        return parent
    return None

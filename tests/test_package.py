"""What `pip install` ships: every subpackage of limiting and the Lua scripts, importable from
an installed copy (not the checkout), so an adopting app gets the whole library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# With test_adopter on one xdist worker: a build writes egg-info into the source tree.
pytestmark = pytest.mark.xdist_group("build")

CHECK = """
import importlib, pkgutil, limiting
from limiting.stores.scripts import script_source
assert not limiting.__file__.startswith({root!r}), limiting.__file__
names = [m.name for m in pkgutil.walk_packages(limiting.__path__, "limiting.")]
for name in names:
    if not name.endswith("__main__"):
        importlib.import_module(name)
for script in ("acquire", "settle", "observe", "key"):
    assert "redis.call" in script_source(script), script
print(len(names))
"""


@pytest.mark.slow
def test_an_installed_copy_has_every_module_and_script(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    found = subprocess.run([sys.executable, "-c", CHECK.format(root=str(ROOT))],
                           cwd=tmp_path, env={"PYTHONPATH": str(target)},
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    on_disk = [p for p in (ROOT / "limiting").rglob("*.py") if p.name != "__init__.py"]
    assert int(found.stdout.split()[-1]) >= len(on_disk)

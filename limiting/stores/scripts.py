"""The Lua scripts, shipped as .lua files inside the package (lua/ in the source tree)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path


@cache
def script_source(name: str) -> str:
    """Text of ``lua/<name>.lua``: installed as ``limiting/lua``, read in place in a checkout."""
    try:
        return resources.files("limiting.lua").joinpath(f"{name}.lua").read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        checkout = Path(__file__).resolve().parents[2] / "lua" / f"{name}.lua"
        return checkout.read_text("utf-8")

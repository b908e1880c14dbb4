"""The Lua scripts, shipped as .lua files inside the package (lua/ in the source tree).

A line ``--#include NAME`` stands for ``lua/NAME.lua`` (one level): acquire.lua and
settle.lua share windows.lua's reading and writing of a sliding window, so the two can never
disagree on its layout. Redis runs the text put together; its SHA is of that text.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path

_INCLUDE = re.compile(r"^--#include (\w+)$", re.MULTILINE)


def _read(name: str) -> str:
    """Text of ``lua/<name>.lua``: installed as ``limiting/lua``, read in place in a checkout."""
    try:
        return resources.files("limiting.lua").joinpath(f"{name}.lua").read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        checkout = Path(__file__).resolve().parents[2] / "lua" / f"{name}.lua"
        return checkout.read_text("utf-8")


@cache
def script_source(name: str) -> str:
    """The script ``name`` as Redis runs it: its file, each include put in place."""
    return _INCLUDE.sub(lambda m: _read(m.group(1)).rstrip("\n"), _read(name))

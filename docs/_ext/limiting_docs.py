"""Sphinx directives that read the code, so the reference pages need no edits when it changes.

``.. limiting-api::`` documents every name in ``limiting.__all__`` (whatever it holds today) from
its docstring; ``.. policy-reference::`` writes the policy file's tables from policy_ref.py,
and turns each disagreement between the reader and its example into a build warning (an
error under ``sphinx-build -W``).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import policy_ref  # docs/_ext, on sys.path by conf.py
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

log = logging.getLogger(__name__)


def _kind(value: Any) -> str:
    if inspect.isclass(value):
        return "class"
    if callable(value):
        return "function"
    return "data"


class LimitingApi(SphinxDirective):
    """A summary table and one autodoc entry per public name, in ``__all__``'s order."""

    def run(self) -> list[nodes.Node]:
        import limiting

        names = list(limiting.__all__)
        kinds = {name: _kind(getattr(limiting, name)) for name in names}
        lines = [".. currentmodule:: limiting", "", ".. autosummary::", ""]
        lines += [f"   {name}" for name in names]
        for kind, title in (("class", "Classes"), ("function", "Functions"),
                            ("data", "Constants")):
            chosen = [n for n in names if kinds[n] == kind]
            if not chosen:
                continue
            lines += ["", title, "-" * len(title), ""]
            for name in chosen:
                lines += [f".. auto{kind}:: {name}"]
                if kind == "class":
                    lines += ["   :members:"]
                lines += [""]
        return self._parse(lines)

    def _parse(self, lines: list[str]) -> list[nodes.Node]:
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, "<limiting-api>"), 0, node,
                                match_titles=True)
        return list(node.children)


def _literal(text: str) -> str:
    """The example's comments write `code` as Markdown does; reST wants ``code``."""
    return re.sub(r"(?<!`)`([^`]+)`(?!`)", r"``\1``", text)


class PolicyReference(SphinxDirective):
    """One table per policy table: key, type, default, meaning."""

    def run(self) -> list[nodes.Node]:
        keys, problems = policy_ref.keys()
        self.env.note_dependency(str(policy_ref.EXAMPLE))
        for problem in problems:
            log.warning("policy reference: %s", problem, location=self.get_location())
        lines: list[str] = []
        table = None
        for key in keys:
            if key.table != table:
                table = key.table
                title = f"[{table}]" if table else "Top level"
                lines += ["", title, "-" * len(title), "",
                          ".. list-table::", "   :header-rows: 1", "   :widths: 22 18 14 46", "",
                          "   * - key", "     - type", "     - default", "     - meaning"]
            lines += [f"   * - ``{key.key}``", f"     - {key.type}",
                      f"     - {key.default}", f"     - {_literal(key.meaning)}"]
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, "<policy-reference>"), 0, node,
                                match_titles=True)
        return list(node.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("limiting-api", LimitingApi)
    app.add_directive("policy-reference", PolicyReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""Sphinx configuration: the Pallets theme, Markdown pages (MyST), and the reference pages
that read the code itself (_ext/limiting_docs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "flask-llm-limiter"
copyright = "flask-llm-limiter contributors"
release = version = "0.1.0"

extensions = [
    "pallets_sphinx_themes",
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "limiting_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
# The Pallets theme's click and jinja domains cannot answer MyST's "any" lookups.
suppress_warnings = ["myst.domains"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autosummary_generate = False

html_theme = "flask"
html_title = "flask-llm-limiter"
html_show_sourcelink = False
html_context = {"project_links": []}
# Built from a checkout, never on Read the Docs: no version banner to fetch.
version_banner = False

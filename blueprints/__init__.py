"""This app's HTTP faces: the library's blueprints (``limiting.blueprints``), composed the way
this repository's app serves them. An adopting app does the same in its own few lines."""

from __future__ import annotations

from flask import Flask

from limiting import RateLimiter
from limiting.blueprints import health_bp, register_blueprints, usage


def register(app: Flask, limiter: RateLimiter) -> None:
    """Every face of the library; health and the operator's usage page stay unlimited."""
    register_blueprints(app)
    limiter.exempt(health_bp)
    limiter.exempt(usage.usage_page)   # an operator's page refreshes itself
    limiter.exempt(usage.usage_json)

"""The environment variable that holds each provider's API key: a provider whose key is set is
served through its SDK. Standard library only, so gunicorn's master can read it before gevent
patches anything (limiting/gunicorn.py)."""

from __future__ import annotations

import os

PROVIDER_KEYS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


def keyed_providers() -> list[str]:
    """The providers whose key is set in the environment now."""
    return [name for name, key in PROVIDER_KEYS.items() if os.environ.get(key)]

"""An app that adopts the limiter the way its README says: pip install, register the blueprint,
decorate routes. It has packages named ``blueprints`` and ``providers`` of its own (common names
in Flask apps) and no policy file: the built-in policy and, under gunicorn without REDIS_URL,
the embedded store. tests/test_adopter.py copies this folder outside the repository and runs it
against the built wheel."""

from __future__ import annotations

import os

from flask import Flask
from providers import PROVIDER  # the app's own package, as blueprints below

from blueprints import pages  # this app's own packages, not the library's
from limiting import RateLimiter
from limiting.blueprints import chat_bp

app = Flask(__name__)
limiter = RateLimiter(app)
app.register_blueprint(chat_bp)     # POST /chat, charged to the built-in policy's plans
app.register_blueprint(pages)


@app.get("/ping")
@limiter.token_bucket(burst=2, per_second=0.001)
def ping() -> dict[str, str]:
    return {"provider": PROVIDER}


@app.get("/scarce")
@limiter.token_bucket(burst=5, per_second=0.001)
def scarce() -> dict[str, int]:
    return {"worker": os.getpid()}


@app.get("/healthz")
@limiter.exempt
def healthz() -> dict[str, int]:
    return {"worker": os.getpid()}

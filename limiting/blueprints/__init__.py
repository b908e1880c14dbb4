"""HTTP faces only: each blueprint parses, asks the limiter, calls upstream, answers."""

from flask import Flask

from .chat import bp as chat_bp
from .errors import register_error_handlers
from .health import bp as health_bp
from .usage import bp as usage_bp
from .v1 import anthropic_bp, openai_bp


def register_blueprints(app: Flask) -> None:
    register_error_handlers(app)
    app.register_blueprint(chat_bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(openai_bp)
    app.register_blueprint(anthropic_bp)
    app.register_blueprint(usage_bp)


__all__ = ["anthropic_bp", "chat_bp", "health_bp", "openai_bp", "register_blueprints",
           "register_error_handlers", "usage_bp"]

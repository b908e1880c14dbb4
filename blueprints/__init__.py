"""HTTP faces only: each blueprint parses, asks the limiter, calls upstream, answers."""

from flask import Flask

from .chat import bp as chat_bp
from .errors import register_error_handlers
from .health import bp as health_bp


def register_blueprints(app: Flask) -> None:
    register_error_handlers(app)
    app.register_blueprint(chat_bp)
    app.register_blueprint(health_bp)


__all__ = ["chat_bp", "health_bp", "register_blueprints", "register_error_handlers"]

"""The Flask integration: the extension (init_app, the decorators, rendering refusals), the
per-IP edge through Flask-Limiter, who is asking, the body deadline, the operator commands
and the refusal logs. Named ``web`` so it never shadows the ``flask`` package."""

"""Where a request's Outcome and what it charged were first defined; they now live with the
executor (limiting/executor.py). Kept so that callers importing them from here still work."""

from .executor import Charged, Outcome

__all__ = ["Charged", "Outcome"]

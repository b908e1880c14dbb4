"""Limits and store address shared by every contender (no web framework imported here)."""

from __future__ import annotations

import os

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")

# Generous limits, identical for every contender, so the load never gets refused
# and the run measures the cost of the admitted path.
EDGE_PER_IP = "1000000 per minute"
USER_PER_MINUTE = "1000000 per minute"
BUCKET_CAPACITY = 1_000_000
BUCKET_REFILL_PER_SECOND = 100_000.0
DAILY_QUOTA = 100_000_000

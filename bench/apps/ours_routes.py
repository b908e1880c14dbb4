"""Contender ``ours + 2 route limits``: the project's app with two stacked route decorators on
/chat (a token bucket and a sliding window, keyed by the user), so the row shows what route
limits cost on top of the plan's layers: still one store call a request.

The limits are as large as the bench plan's, so the load is never refused.
"""

from __future__ import annotations

from app import create_app
from limiting import sliding_window, token_bucket

app = create_app()
# What `@token_bucket(...)` / `@sliding_window(...)` above the view do: mark it.
chat = app.view_functions["chat.chat"]
token_bucket(burst=1_000_000, per_second=100_000, key="user")(chat)
sliding_window("100000000 per day", key="user", scope="bench")(chat)

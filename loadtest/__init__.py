"""A bounded load run against a local app, with a progress bar and a PNG of what each layer did.

``python -m loadtest --url http://127.0.0.1:8000 --seconds 30 --rate 20 --users 5`` sends
POST /chat at an open-loop rate, spread round-robin over the users, and writes ``load.png``:
admitted and refused requests per second per layer, and the tightest layer's
X-RateLimit-Remaining for one user. It only ever talks to loopback addresses. Every request
comes from 127.0.0.1, so the per-IP edge sees all users as one client.

Modules: cli (arguments, target check), driver (schedule, sending, counts), classify (a response
to an outcome), progress (the bar), plot (PNG), report (summary table, CSV). Needs httpx and
matplotlib (requirements-dev.txt).
"""

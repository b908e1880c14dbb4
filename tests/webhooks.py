"""Local HTTP endpoints the tests talk to (127.0.0.1, a port the kernel picks): a webhook
receiver for alerts and an identity provider's JWKS for JWT identity."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from limiting.core.alerting import SIGNATURE_HEADER


class LocalHttp:
    """``handler`` served on its own thread until :meth:`close`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], path: str) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class Receiver(LocalHttp):
    """A webhook endpoint: records each POST, answers with the next planned status."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.got: list[tuple[dict[str, Any], str, bytes]] = []
        outer = self

        class Handler(Quiet):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append((json.loads(body), self.headers.get(SIGNATURE_HEADER, ""),
                                  body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler, "/hooks/limits")


class JwksServer(LocalHttp):
    """An identity provider's JWKS endpoint that counts its fetches (``fail``: 500s)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document, self.fetches, self.fail = document, 0, False
        outer = self

        class Handler(Quiet):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = b"oops" if outer.fail else json.dumps(outer.document).encode()
                self.send_response(500 if outer.fail else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler, "/.well-known/jwks.json")

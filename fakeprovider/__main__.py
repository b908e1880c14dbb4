"""``python -m fakeprovider``: serve until SIGTERM/SIGINT, for the benchmark.

Prints exactly one line, ``listening on http://HOST:PORT``, once the socket is
bound, so a parent process can wait for it and learn an ephemeral port.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from .app import App
from .server import HTTPServer
from .state import State


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fakeprovider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0 = any free port)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument(
        "--chunk-delay", type=float, default=0.0, help="seconds between streamed words"
    )
    parser.add_argument("--rpm", type=int, default=None, help="enforced requests per minute")
    parser.add_argument("--tpm", type=int, default=None, help="enforced tokens per minute")
    return parser.parse_args(argv)


def _raise_fd_limit() -> None:
    """Lift the soft open-files limit so thousands of connections fit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


async def _serve(args: argparse.Namespace) -> None:
    state = State(args.delay, args.chunk_delay, args.rpm, args.tpm, max_logged=0)
    server = HTTPServer(App(state))
    port = await server.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on http://{args.host}:{port}", flush=True)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parse(argv)
    try:
        State(args.delay, args.chunk_delay, args.rpm, args.tpm)  # validate before binding
    except ValueError as exc:
        print(f"fakeprovider: {exc}", file=sys.stderr)
        return 2
    _raise_fd_limit()
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How each contender is started: argv and environment, per worker class."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Managed

ROOT = Path(__file__).resolve().parent.parent
LIMITS = "bench/limits.bench.toml"
SLOW_MODEL = "gpt-4o-mini"

# Inherited variables that would change what a contender does behind the bench's back.
_SCRUB = (
    "GUNICORN_CMD_ARGS",
    "GUNICORN_WORKER_CLASS",
    "WEB_CONCURRENCY",
    "HOST",
    "PORT",
    "REDIS_URL",
    "LIMITS_CONFIG",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "REQUIRE_API_KEY",
    "TRUSTED_PROXIES",
    "ADMIN_TOKEN",       # set, /metrics would need it: the bench scrapes it from loopback bare
    "METRICS_TOKEN",
)

# gunicorn >= 23 opens a control socket at a fixed per-user path; concurrent gunicorns (other
# people's tests on this machine) would fight over it, and no contender needs it.
_NO_CTL = ["--no-control-socket"]


def base_env(redis_url: str, workers: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["REDIS_URL"] = redis_url
    env["WEB_CONCURRENCY"] = str(workers)
    return env


@dataclass(frozen=True)
class Contender:
    """One row of a table.

    kind: baseline | ours | uvicorn; target: module:app (ours: app:app unless given, e.g. the
    app with two route decorators); worker_class: None = the app's default.
    """

    name: str
    kind: str
    target: str = ""
    worker_class: str | None = None
    root: Path = ROOT   # ours at another commit: that commit's files (see ours_at)

    @property
    def label(self) -> str:
        return self.name

    def missing(self) -> str | None:
        """Why this contender cannot run at all, or None."""
        if self.kind == "ours":
            absent = [f for f in ("app.py", "gunicorn.conf.py") if not (self.root / f).exists()]
            if absent:
                return f"{', '.join(absent)} not found in {self.root}"
        return None

    def process(
        self,
        port: int,
        redis_url: str,
        workers: int,
        logdir: Path,
        upstream: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Managed:
        env = base_env(redis_url, workers) | (extra_env or {})
        if self.root != ROOT:   # its own app and package first, ahead of the editable install
            env["PYTHONPATH"] = str(self.root)
        if upstream is not None:
            env["OPENAI_API_KEY"] = "sk-fake"
            env["OPENAI_BASE_URL"] = f"{upstream}/v1"
            # A provider key turns ours' API-key requirement on; /chat is compared the
            # article's way (the body's user_id), as every other contender serves it.
            env.setdefault("REQUIRE_API_KEY", "0")
        if self.kind == "baseline":
            env["BENCH_BIND"] = f"127.0.0.1:{port}"
            env["BENCH_WORKER_CLASS"] = self.worker_class or "gevent"
            argv = [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "bench/gunicorn_baseline.py",
                *_NO_CTL,
                self.target,
            ]
        elif self.kind == "ours":
            env["HOST"] = "127.0.0.1"
            env["PORT"] = str(port)
            env.setdefault("LIMITS_CONFIG", LIMITS)   # extra_env may name another policy
            if self.worker_class:
                env["GUNICORN_WORKER_CLASS"] = self.worker_class
            if self.worker_class == "sync":
                # gunicorn runs gthread instead of sync whenever threads > 1, and
                # gunicorn.conf.py sets threads (GUNICORN_THREADS, default 64) for every class.
                env["GUNICORN_THREADS"] = "1"
            target = self.target or "app:app"
            argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *_NO_CTL, target]
        elif self.kind == "uvicorn":
            # Plain uvicorn as the article installs it: asyncio loop and h11, no extras.
            # Access log off, as gunicorn's is by default, so neither side pays for logging.
            argv = [
                sys.executable, "-m", "uvicorn", self.target,
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                "--loop", "asyncio", "--http", "h11", "--no-access-log", "--log-level", "warning",
            ]  # fmt: skip
        else:
            raise ValueError(self.kind)
        slug = self.name.replace(" ", "_").replace("(", "").replace(")", "").replace(":", "")
        return Managed(self.name, argv, env, self.root, logdir / f"{slug}-{port}.log")


def ours_with_route_limits(worker_class: str | None) -> Contender:
    """The echo section's row for route limits: two stacked decorators on /chat."""
    return Contender("ours + 2 route limits", "ours", "bench.apps.ours_routes:app", worker_class)


def ours_at(rev: str, worker_class: str | None) -> Contender:
    """Ours as of commit ``rev`` (its files from ``git archive``, run from their own folder on
    this venv): the same run compares what a change costs, e.g. a request that meets none of
    a later commit's features against the commit before them."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    folder = ROOT / "bench" / "out" / f"rev-{sha}"
    if not (folder / "app.py").exists():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return Contender(f"ours at {sha}", "ours", worker_class=worker_class, root=folder)


def ours_default_worker_class() -> str:
    """The worker class gunicorn.conf.py picks when GUNICORN_WORKER_CLASS is unset (best effort)."""
    code = (
        "import runpy,sys; cfg = runpy.run_path('gunicorn.conf.py'); "
        "sys.stdout.write(str(cfg.get('worker_class', 'sync')))"
    )
    env = base_env("unix:///nonexistent.sock", 4)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (subprocess.TimeoutExpired, OSError):
        return "?"
    out = done.stdout.strip().splitlines()
    return out[-1] if done.returncode == 0 and out else "?"

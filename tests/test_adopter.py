"""The path of a user who pip-installs us into their own Flask app, tested as that user: the
BUILT WHEEL (built once per session), installed into a fresh virtual environment outside the
repository, and tests/adopter_app (its own ``blueprints`` and ``providers`` packages, no policy
file) copied beside it. Nothing of the checkout is on the path of the processes run there."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_http
from tests.policies import loaded_toml

# One xdist worker builds: a build writes egg-info into the source tree, so two at once (this
# file and test_package) collide.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("build")]

APP = ROOT / "tests" / "adopter_app"
# A shell of the adopter's has none of these unless they set them.
OURS = ("REDIS_URL", "LIMITS_CONFIG", "LIMITER_INSTANCE", "PROMETHEUS_MULTIPROC_DIR",
        "PYTHONPATH", "VIRTUAL_ENV", "OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL", "REQUIRE_API_KEY", "WEB_CONCURRENCY", "HOST", "PORT", "FLASK_APP",
        "GUNICORN_CMD_ARGS", "GUNICORN_WORKER_CLASS", "ADMIN_TOKEN")


@dataclass(frozen=True)
class Adopter:
    """The built distributions and a virtual environment with the wheel installed."""

    dist: Path
    venv: Path

    @property
    def wheel(self) -> Path:
        return next(self.dist.glob("*.whl"))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in OURS}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A command of the venv's (``flask``, ``python``...) run in ``cwd``, as the user would."""
        return subprocess.run([str(self.venv / "bin" / args[0]), *args[1:]], cwd=cwd,
                              env=self.env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def adopter(tmp_path_factory: pytest.TempPathFactory) -> Adopter:
    base = tmp_path_factory.mktemp("adopter")
    assert not base.is_relative_to(ROOT)
    dist, venv = base / "dist", base / "venv"
    # Built from a clean copy of the sources: nothing the checkout's tools left (an editable
    # install's egg-info, caches, a venv) can reach the sdist, and nothing is written into it.
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "dist", "instance", "_build", "__pycache__",
        ".*_cache"))
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
                           capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The runtime pins as constraints: the versions the suite runs on, and pip's cache hits.
    # --no-compile: compiling every installed file is most of the install's CPU; an import
    # compiles what it uses (at a load of 30 the install took over 600 s with it).
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--no-compile", "-c", str(ROOT / "requirements.txt"),
                           str(next(dist.glob("*.whl")))],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return Adopter(dist, venv)


@pytest.fixture
def app_folder(adopter: Adopter, tmp_path: Path) -> Path:
    folder = tmp_path / "yourapp"
    shutil.copytree(APP, folder, ignore=shutil.ignore_patterns("__pycache__", "instance"))
    return folder


def session_members(sid: int) -> list[int]:
    """Processes whose session is ``sid`` (the server was started as a session of its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[3]) == sid:
                found.append(int(stat.parent.name))
    return found


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def gunicorn(adopter: Adopter, folder: Path, *args: str) -> Iterator[Served]:
    """gunicorn of the venv in ``folder``, a session of its own; after the block, SIGTERM and
    no process of that session left (else each is killed, and the test fails)."""
    port = free_port()
    log = folder / "gunicorn.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(adopter.venv / "bin" / "gunicorn"), "-b",
                                 f"127.0.0.1:{port}", *args], cwd=folder, env=adopter.env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    left: list[int] = []
    try:
        served = Served(f"http://127.0.0.1:{port}", proc, log)
        wait_http(served.url + "/healthz", timeout=60, proc=proc)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while (left := session_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left or proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert left == [], f"left running after SIGTERM: {left}"


# The store's budget on a loaded box (tests/README.md, rule 6), and the policy the library
# serves when an app has none: the adopters' gunicorn tests serve it as the app's own file.
LOADED = loaded_toml() + "\n"
BUILT_IN = (ROOT / "limiting" / "default_limits.toml").read_text()


def fire(url: str, n: int) -> list[int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    with httpx.Client(limits=limits, timeout=60) as client, ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: client.get(url).status_code, range(n)))


def chat(url: str, user: str) -> httpx.Response:
    return httpx.post(url + "/chat", json={"message": "hi", "user_id": user}, timeout=60)


def test_a_the_distribution_is_one_package_and_passes_twine(adopter: Adopter) -> None:
    with zipfile.ZipFile(adopter.wheel) as wheel:
        names = wheel.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        rows = wheel.read(record).decode().splitlines()
        assert wheel.read(top_level).decode().split() == ["limiting"]
    tops = {row.split(",")[0].split("/")[0] for row in rows if row}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"limiting"}
    # Every folder of the library, the scripts, the templates and the built-in policy.
    shipped = {row.split(",")[0] for row in rows}
    folders = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "limiting").rglob("*.py")}
    assert {str(Path(n).parent) for n in shipped} >= folders
    assert {f"limiting/lua/{p.name}" for p in (ROOT / "lua").glob("*.lua")} <= shipped
    assert "limiting/blueprints/templates/usage.html" in shipped
    assert "limiting/default_limits.toml" in shipped
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                              *map(str, adopter.dist.iterdir())],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert len(list(adopter.dist.glob("*.tar.gz"))) == 1


ZERO = """
import json
from myapp import app
import blueprints, limiting, providers
client = app.test_client()
pings = [client.get("/ping") for _ in range(3)]
chat = client.post("/chat", json={"message": "hi", "user_id": "u1"})
print(json.dumps({
    "codes": [r.status_code for r in pings], "retry_after": pings[2].headers.get("Retry-After"),
    "chat": chat.status_code, "ratelimit": chat.headers.get("RateLimit"),
    "policy": chat.headers.get("RateLimit-Policy"),
    "own": client.get("/pages/hello").get_json(), "providers": pings[0].get_json(),
    "files": [blueprints.__file__, providers.__file__, limiting.__file__]}))
"""


def test_b_zero_configuration_in_one_process(adopter: Adopter, app_folder: Path) -> None:
    done = adopter.run("python", "-c", ZERO, cwd=app_folder)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["codes"] == [200, 200, 429] and int(out["retry_after"]) >= 1
    assert out["chat"] == 200 and '"quota-day";r=99' in out["ratelimit"]
    assert '"user";q=10' in out["policy"]             # the built-in starter plan
    assert out["own"] == {"from": "blueprints"}       # the app's own package, not ours
    assert out["providers"] == {"provider": "the adopter's own providers package"}
    own_blueprints, own_providers, library = map(Path, out["files"])
    assert own_blueprints.is_relative_to(app_folder) and own_providers.is_relative_to(app_folder)
    assert library.is_relative_to(adopter.venv)
    said = [line for line in done.stderr.splitlines() if "no REDIS_URL" in line]
    assert len(said) == 1 and "per process" in said[0], done.stderr


def test_c_d_e_gunicorn_from_the_package_and_the_cli(adopter: Adopter, app_folder: Path
                                                     ) -> None:
    instance = app_folder / "instance"
    # The built-in policy, as the app's own limits.toml with a loaded box's store budget in
    # front: at the default 50 ms a loaded CI box turned the first call into a fail-closed 503
    # (tests/README.md, rule 6). The limits it checks are the built-in file's own.
    (app_folder / "limits.toml").write_text(LOADED + BUILT_IN)
    with gunicorn(adopter, app_folder, "-c", "python:limiting.gunicorn", "-w", "4",
                  "myapp:app") as served:
        assert (instance / "valkey.sock").exists()     # the embedded store, in its folder
        assert [chat(served.url, "carol").status_code for _ in range(3)] == [200] * 3
        codes = fire(served.url + "/scarce", 40)
        assert codes.count(200) == 5 and codes.count(429) == 35, codes
        # (d) the CLI, from the app's folder, reaches the store gunicorn serves from.
        show = adopter.run("flask", "--app", "myapp", "limits", "show", "carol", cwd=app_folder)
        assert show.returncode == 0, show.stderr
        rows = {line.split()[0]: line.split()[1:] for line in show.stdout.splitlines()[2:]}
        assert rows["quota-day"][:2] == ["100", "97"], show.stdout
        reset = adopter.run("flask", "--app", "myapp", "limits", "reset", "carol",
                            cwd=app_folder)
        assert reset.returncode == 0, reset.stderr
        assert_the_other_commands_work(adopter, app_folder)
        time.sleep(10)   # the edge's window (20 per 10 seconds) that the burst filled
        assert '"quota-day";r=99' in chat(served.url, "carol").headers["RateLimit"]
        log = served.log.read_text()
    assert len(re.findall(r"Booting worker with pid", log)) == 4
    assert "Using worker: gevent" in log and "embedded Valkey" in log
    assert f"policy accepted {app_folder / 'limits.toml'}" in log   # the master checked it
    assert not (instance / "valkey.sock").exists()
    assert (instance / "prometheus").is_dir()


def assert_the_other_commands_work(adopter: Adopter, folder: Path) -> None:
    """keys create|list|revoke, spend and audit: on the store gunicorn serves from."""
    def flask(*args: str) -> str:
        done = adopter.run("flask", "--app", "myapp", *args, cwd=folder)
        assert done.returncode == 0, done.stderr
        return done.stdout

    key_id = flask("keys", "create", "dave", "--plan", "pro").split()[2]
    assert re.search(rf"^{key_id}\s+dave\s+pro\s", flask("keys", "list"), re.M)
    flask("keys", "revoke", key_id)
    # /chat's echo model spends nothing: the command answers from the store, with no spender
    # (exit 1 says so), not an unreachable store (exit 2).
    spend = adopter.run("flask", "--app", "myapp", "spend", "user", "carol", "--anonymous",
                        "--days", "1", cwd=folder)
    assert spend.returncode in (0, 1) and "user carol" in spend.stdout, spend.stderr
    trail = flask("audit")
    assert "keys.create" in trail and "keys.revoke" in trail and "limits.reset" in trail


def test_an_own_gunicorn_config_keeps_its_settings_and_adds_ours(
        adopter: Adopter, app_folder: Path) -> None:
    """The app's gunicorn.conf.py (read by gunicorn without -c): ``from limiting.gunicorn import
    *``, settings and a hook of its own that calls ours. Then the app's limits.toml changes and
    ``kill -HUP`` makes it the policy."""
    # The built-in policy with a loaded box's store budget (tests/README.md, rule 6): at the
    # default 50 ms, a loaded box's missed budget let one /scarce call through its fail_open
    # bucket, 6 of 12 admitted.
    (app_folder / "limits.toml").write_text(LOADED + BUILT_IN)
    with gunicorn(adopter, app_folder, "myapp:app") as served:
        assert (app_folder / "started-by-own-config").read_text() == "2"   # its hook ran
        assert (app_folder / "instance" / "valkey.sock").exists()          # and ours
        assert fire(served.url + "/scarce", 12).count(200) == 5
        before = chat(served.url, "dan")
        assert '"user";q=10' in before.headers["RateLimit-Policy"]
        (app_folder / "limits.toml").write_text(
            LOADED + "[plans.tiny]\nburst = 3\nrefill_per_second = 0.01\n")
        served.proc.send_signal(signal.SIGHUP)
        deadline, seen, i = time.monotonic() + 60, "", 0
        while time.monotonic() < deadline and '"user";q=3' not in seen:
            time.sleep(1)   # inside the built-in edge's 20 per 10 seconds
            i += 1
            with contextlib.suppress(httpx.HTTPError):
                seen = chat(served.url, f"erin-{i}").headers.get("RateLimit-Policy", "")
        assert '"user";q=3' in seen, served.log.read_text()[-3000:]
        log = served.log.read_text()
    assert len(re.findall(r"Booting worker with pid", log.split("Handling signal: hup")[0])) == 2

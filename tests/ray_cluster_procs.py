"""A real multi-node Ray cluster on this machine, made of `ray start --block` processes that
the caller owns: every port is chosen here (so it cannot collide with the pytest session's own
Ray or another cluster on the machine), every node gets its own --temp-dir (so the machine-wide
/tmp/ray/ray_current_cluster is never touched, and two nodes never share one runtime_resources/
folder, as they would by default on one machine: a worker node then unpacks a job's working_dir
over the very folder that is the driver's cwd on the head), and stop() ends exactly the processes started
here — SIGTERM to each `ray start --block` (which kills its node's processes), then SIGKILL to
their process groups, then to any process left whose command line names this cluster's session
— never `ray stop`, which would end every Ray on the machine."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
# Worker ports come from fixed ranges below the kernel's ephemeral range (32768+), where no
# process gets a port unless it asks for one, and above `ray start`'s default 10002-19999.
WORKER_PORT_SPAN = 60
WORKER_PORT_LOW, WORKER_PORT_HIGH = 20000, 32000


def _bindable(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now (all held open together while choosing them)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)))
            s.bind(("", 0))
            ports.append(s.getsockname()[1])
        return ports


def free_port_range(span: int, taken: set[int]) -> tuple[int, int]:
    for _ in range(200):
        low = random.randrange(WORKER_PORT_LOW, WORKER_PORT_HIGH - span)
        ports = range(low, low + span)
        if not taken.intersection(ports) and all(_bindable(p) for p in ports):
            taken.update(ports)
            return low, low + span - 1
    raise RuntimeError(f"no {span} consecutive free ports in {WORKER_PORT_LOW}-{WORKER_PORT_HIGH}")


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and int(e.name) != os.getpid()]


def descendants(roots: list[int]) -> dict[int, int]:
    """pid -> start time of every live process below the roots (roots included). Ray puts each
    worker in its own process group and each job driver in its own session, so the process
    groups of the `ray start` commands do not hold everything; the parent links do."""
    children: dict[int, list[int]] = {}
    start: dict[int, int] = {}
    for pid in _pids():
        st = _stat(pid)
        if st:
            children.setdefault(st[0], []).append(pid)
            start[pid] = st[2]
    found, todo = {}, [p for p in roots if p in start]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = start[pid]
            todo.extend(children.get(pid, []))
    return found


def marked_processes(markers: list[str]) -> dict[int, int]:
    """pid -> start time of every live process whose command line or environment names one of
    the markers (this cluster's temp dir, GCS address: RAY_ADDRESS of its jobs' drivers)."""
    found = {}
    for pid in _pids():
        text = _cmdline(pid).encode() + b"\0" + _environ(pid)
        if any(m.encode() in text for m in markers):
            st = _stat(pid)
            if st and st[1] != "Z":
                found[pid] = st[2]
    return found


def alive(procs: dict[int, int]) -> dict[int, str]:
    """The processes of ``procs`` still running (same pid and start time, not a zombie)."""
    out = {}
    for pid, started in procs.items():
        st = _stat(pid)
        if st and st[2] == started and st[1] != "Z":
            out[pid] = _cmdline(pid) or f"pid {pid}"
    return out


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    temp_dir: str


@dataclass
class LocalRayCluster:
    """`ray start --head` plus worker nodes, all on 127.0.0.1, each a `ray start --block` child."""

    # Short on purpose: Unix socket paths under a temp dir must stay below ~107 bytes.
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))
    log_dir: Path | None = None
    object_store_memory: int = 300 * 1024 * 1024
    env: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    _taken: set[int] = field(default_factory=set)
    _worker_temp_dirs: list[str] = field(default_factory=list)

    @property
    def gcs_address(self) -> str:
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def temp_dirs(self) -> list[str]:
        """The head's temp dir, then each worker node's."""
        return [self.temp_dir, *self._worker_temp_dirs]

    @property
    def markers(self) -> list[str]:
        """Strings found in the command line or environment of this cluster's processes (and of no other)."""
        markers = list(self.temp_dirs)
        if self.gcs_port:
            markers.append(f"{HOST}:{self.gcs_port}")
            address_file = Path(self.temp_dir, "ray_current_cluster")
            if address_file.exists():   # Ray swaps 127.0.0.1 for the machine's routable IP
                markers.append(address_file.read_text().strip())
        return markers

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The jobs' `python` and the CLIs are this interpreter's, activated or not.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env.pop("RAY_ADDRESS", None)
        env.setdefault("RAY_AUTH_MODE", "disabled")   # ~/.ray/auth_token would turn token auth on
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # SIGTERM to `ray start --block` drains the node for up to 30 s first; not wanted here.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        env.update(self.env)
        return env

    def ray_cli(self) -> str:
        return os.path.join(os.path.dirname(sys.executable), "ray")

    def _start(self, name: str, args: list[str], ready_timeout: float, temp_dir: str) -> Node:
        ports = free_ports(6)
        low, high = free_port_range(WORKER_PORT_SPAN, self._taken)
        node_manager, object_manager, agent_http, agent_grpc, runtime_env_agent, metrics = ports
        command = [self.ray_cli(), "start", *args, "--block", "--disable-usage-stats",
                   f"--node-ip-address={HOST}", f"--temp-dir={temp_dir}", f"--object-store-memory={self.object_store_memory}",
                   f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
                   f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                   f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
                   f"--min-worker-port={low}", f"--max-worker-port={high}"]
        log_dir = Path(self.log_dir or self.temp_dir)
        log = log_dir / f"ray-start-{name}.log"
        with open(log, "wb") as out:
            # Own session and process group: stop() can signal the whole tree without touching ours.
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.process_env(), start_new_session=True)
        node = Node(name, proc, log, temp_dir)
        self.nodes.append(node)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return node
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` for {name} exited with {proc.returncode}:\n{text[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"`ray start` for {name} not up in {ready_timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")

    def start_head(self, num_cpus: int = 1, num_gpus: int = 0, ready_timeout: float = 120) -> Node:
        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        return self._start("head", ["--head", f"--port={self.gcs_port}",
                                    "--include-dashboard=true", f"--dashboard-host={HOST}",
                                    f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client_port}",
                                    f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"], ready_timeout, self.temp_dir)

    def add_worker(self, name: str, num_cpus: int = 1, num_gpus: int = 0, ready_timeout: float = 120) -> Node:
        # Its own --temp-dir: without one a worker node takes the head's (from the GCS).
        temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
        self._worker_temp_dirs.append(temp_dir)
        return self._start(name, [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                                  f"--num-gpus={num_gpus}"], ready_timeout, temp_dir)

    def wait_for_nodes(self, n: int, timeout: float = 120) -> list:
        """The alive nodes (ray.util.state NodeState) once n are registered."""
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout
        while True:
            try:
                alive = [nd for nd in list_nodes(address=self.dashboard_url, raise_on_missing_output=False)
                         if nd.state == "ALIVE"]
            except Exception:  # dashboard still starting
                alive = []
            if len(alive) >= n:
                return alive
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {n} nodes alive after {timeout:.0f} s")
            time.sleep(1)

    def processes(self) -> dict[int, int]:
        """pid -> start time of every live process of this cluster."""
        return {**descendants([n.proc.pid for n in self.nodes]), **marked_processes(self.markers)}

    def stop(self, timeout: float = 60) -> dict[int, str]:
        """End every process this cluster started. Returns the ones still alive afterwards
        (empty when all went)."""
        procs = self.processes()
        for node in reversed(self.nodes):          # workers first, then the head
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for node in self.nodes:
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)   # the group is ours: start_new_session=True
            except (ProcessLookupError, PermissionError):
                pass
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Workers and job drivers live outside those groups; they exit when their raylet goes.
        # Give them a moment, then kill by pid whatever of ours is left.
        deadline = time.monotonic() + 10
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        procs.update(marked_processes(self.markers))
        for pid in alive(procs):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.nodes.clear()
        return alive(procs)

    def save_logs(self, dest: Path) -> None:
        """Copy every node's Ray logs (raylet, agents, job drivers, workers) to dest/<temp dir name>."""
        for temp_dir in self.temp_dirs:
            logs = Path(temp_dir, "session_latest", "logs")
            if logs.is_dir():
                shutil.copytree(logs, Path(dest) / Path(temp_dir).name, ignore_dangling_symlinks=True,
                                dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "events"))

    def remove_temp_dirs(self) -> None:
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)

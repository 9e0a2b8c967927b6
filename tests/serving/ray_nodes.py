"""A Ray cluster of several nodes on one host, for the multi-node tests: each node a `ray start --block` process
with ports of its own, stopped the way `ray stop` stops a node (SIGTERM, then SIGKILL after a grace period) or
killed hard (SIGKILL to every process at once, as when a machine dies).

`ray stop` itself cannot be used here: it stops every Ray process of the host, whichever node it belongs to. A
node's processes are the `ray start --block` process and its descendants (the raylet, the agents, the log monitor,
and the raylet's worker processes, replicas and proxies among them), read from /proc.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from serve_helpers import free_port

STOP_GRACE_S = 16.0  # `ray stop --grace-period`'s default


def venv_bin(name: str) -> str:
    """A console script of the Python running the tests (the venv's `ray` and `serve`)."""
    return str(Path(sys.executable).parent / name)


def cluster_env(**extra: str) -> dict[str, str]:
    """The environment of every node and client of one test cluster: token authentication with a token of its
    own (Ray 2.60 turns token auth on for a new head when ~/.ray/auth_token exists, and a worker must then present
    the token), no usage stats."""
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@dataclass
class NodePorts:
    """Every port a Ray node binds, so that two nodes share a host (workers get a range below the ephemeral one)."""

    node_manager: int
    object_manager: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int
    metrics_export: int
    min_worker: int
    max_worker: int

    @classmethod
    def pick(cls, worker_range_start: int) -> "NodePorts":
        return cls(*(free_port() for _ in range(6)), worker_range_start, worker_range_start + 99)

    def args(self) -> list[str]:
        return [f"--node-manager-port={self.node_manager}", f"--object-manager-port={self.object_manager}",
                f"--dashboard-agent-listen-port={self.dashboard_agent_listen}",
                f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
                f"--runtime-env-agent-port={self.runtime_env_agent}", f"--metrics-export-port={self.metrics_export}",
                f"--min-worker-port={self.min_worker}", f"--max-worker-port={self.max_worker}"]


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process of the host."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class RayNode:
    """One node of a test cluster: `ray start --block <args>` in a session of its own, its output in ``log``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path):
        self.name, self.args, self.env, self.log = name, args, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RayNode":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([venv_bin("ray"), "start", "--block", *self.args], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def pids(self) -> list[int]:
        """The node's processes: the `ray start` process and every descendant."""
        if self.proc is None:
            return []
        tree, found, todo = _children(), [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            if _alive(pid):
                found.append(pid)
            todo += tree.get(pid, [])
        return found

    def _signal(self, pids: list[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """What `ray stop` does to this node's processes: SIGTERM to each, SIGKILL to those left after ``grace_s``."""
        pids = self.pids()
        self._signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        self.kill(pids)

    def kill(self, pids: list[int] | None = None) -> None:
        """SIGKILL to every process of the node at once: the node is gone as if its machine had died."""
        pids = self.pids() if pids is None else pids
        self._signal(pids, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


# A custom resource only the head has: a gateway that takes it (gateway.resources) runs there.
GATEWAY_RESOURCE = "dit-gateway"


class TwoNodeCluster:
    """A head that takes no replicas (``--num-cpus 0``: the controller, a proxy, the dashboard) and a worker node
    with the CPUs, joined with ``ray start --address``; each with ports of its own. The worker's Serve proxy binds
    ``worker_proxy_port`` (Ray Serve's ``RAY_SERVE_WORKER_PROXY_HTTP_PORT``, read by proxies on non-head nodes);
    SO_REUSEPORT is off, so two proxies can never silently share one port."""

    def __init__(self, worker_cpus: int = 2):
        # Short: Ray's Unix socket paths live under it and must stay under 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dit2n-", dir="/tmp"))
        self.env = cluster_env(SERVE_SOCKET_REUSE_PORT_ENABLED="0")
        self.token = self.env["RAY_AUTH_TOKEN"]
        self.gcs_port, self.dashboard_port, self.client_port = free_port(), free_port(), free_port()
        self.head_proxy_port, self.worker_proxy_port = free_port(), free_port()
        self.head_ports, self.worker_ports = NodePorts.pick(21000), NodePorts.pick(21200)
        common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        self.head = RayNode("head", ["--head", f"--port={self.gcs_port}", "--num-cpus=0",
                                     "--resources=" + json.dumps({GATEWAY_RESOURCE: 1}),
                                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                     f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp_dir}",
                                     "--system-config=" + json.dumps({"metrics_report_interval_ms": 1000}),
                                     *common, *self.head_ports.args()], self.env, self.temp_dir / "head.out")
        self.worker = RayNode("worker", [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={worker_cpus}",
                                         *common, *self.worker_ports.args()],
                              {**self.env, "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(self.worker_proxy_port)},
                              self.temp_dir / "worker.out")
        self.dashboard = httpx.Client(base_url=f"http://127.0.0.1:{self.dashboard_port}", timeout=30,
                                      headers={"Authorization": f"Bearer {self.token}"})

    def start_head(self, timeout_s: float = 90) -> float:
        """Start the head; seconds until its dashboard answers."""
        self.head.start()
        return self._wait(lambda: self._get("/api/ray/version") is not None, timeout_s, "the head's dashboard")

    def start_worker(self, timeout_s: float = 180) -> float:
        """Start (or restart) the worker node; seconds until the cluster has a new alive node (11-13 s here; once it
        never joined within 90 s, for no reason found, so the wait allows twice that). When `ray start --block`
        itself exits instead (once on two busy cores: "The current node timed out during startup", its GCS query
        past Ray's 30 s deadline), the node is started once more: Ray's start-up, not what the tests check."""
        known = {n["raylet"]["nodeId"] for n in self.nodes()}
        for attempt in (1, 2):
            self.worker.start()
            try:
                seconds = self._wait(lambda: self.worker.proc.poll() is not None or
                                     any(n["raylet"]["nodeId"] not in known for n in self.alive_nodes()),
                                     timeout_s, "the worker node")
            except AssertionError as e:
                raise AssertionError(f"{e}; its `ray start` said:\n{self.worker.log.read_text()[-3000:]}") from None
            if self.worker.proc.poll() is None:
                return seconds
            if attempt == 2:
                raise AssertionError(f"the worker's `ray start` exited twice ({self.worker.proc.returncode}); it "
                                     f"said:\n{self.worker.log.read_text()[-3000:]}")
            self.worker.kill()  # whatever the failed start left running

    def _get(self, path: str) -> dict | None:
        try:
            r = self.dashboard.get(path)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    @staticmethod
    def _wait(ready, timeout_s: float, what: str) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if ready():
                return time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(f"{what} not ready within {timeout_s} s")

    def nodes(self) -> list[dict]:
        return (self._get("/nodes?view=summary") or {}).get("data", {}).get("summary", [])

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n["raylet"]["state"] == "ALIVE"]

    def serve(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """`serve <args> -a <the head's dashboard>`, as a user runs it."""
        return subprocess.run([venv_bin("serve"), *args, "-a", f"http://127.0.0.1:{self.dashboard_port}"],
                              env=self.env, capture_output=True, text=True, timeout=timeout_s)

    def serve_details(self) -> dict:
        return self._get("/api/serve/applications/") or {}

    def discovery_file(self) -> Path:
        """Ray's Prometheus service-discovery file: every node's metrics export address."""
        return self.temp_dir / "prom_metrics_service_discovery.json"

    def shutdown(self) -> None:
        """Both nodes gone, whatever state they are in (worker first: it must not outlive its head)."""
        for node in (self.worker, self.head):
            node.kill()
        self.dashboard.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

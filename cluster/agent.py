"""The host agent: one per host, the cluster's hands on that host's fmplexd.

It drives the local fmplexd over its control socket, as any operator would (deploy, remove, list,
resolve, info), and reports the host: its memory, its backbones and every cluster task on it with
its endpoint, rate and latency. fmplexd knows nothing of the cluster: it stays a systemd service
that works without one, and a host whose agent dies keeps serving.

The controller runs one agent per host as a detached Ray actor pinned to the host's node by its
label (cluster/controller.py); this module itself does not import Ray, so it is tested against a
real fmplexd alone.

Which tasks are the cluster's: the agent writes each cluster task's host spec to
{state_dir}/specs/NAME.toml and deploys from that path (so a restarted fmplexd restores it from
there too); a task without such a file was deployed by someone else and is neither reported nor
touched. Each task's tcp:// endpoint gets a port of the host's task port range, chosen once and
kept in its spec across redeploys (a range apart from the kernel's ephemeral ports, which the
host's own outgoing connections take at random).

Errors reach the controller as AgentError (a plain exception Ray can carry), with the typed
error's text.

A replica's rate is measured here, over the last RATE_WINDOW_S of reports (completed requests
counted by fmplexd), so an autoscaler sees a task go quiet within seconds; the daemon's own rate
covers its last 10 s.
"""
from __future__ import annotations

import collections
import os
import socket
import threading
import time
import tomllib

from cluster.reports import HostReport, ReplicaReport
from cluster.specs import host_spec
from fmplex.client import Client
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import Deploy, Info, ListTasks, RemoveTask, Resolve

DEFAULT_PORTS = (20000, 29999)
REPORT_TIMEOUT_S = 1.0
DEPLOY_TIMEOUT_S = 180.0
RATE_WINDOW_S = 3.0


class AgentError(RuntimeError):
    """An agent's action failed (the message says why: the typed error's text)."""


class HostAgent:
    def __init__(self, host: str, run_dir: str, state_dir: str, advertise: str,
                 memory_bytes: int = 0, ports: tuple[int, int] = DEFAULT_PORTS):
        """run_dir: the local fmplexd's ("" = its default); advertise: the address task
        endpoints bind and clients reach; memory_bytes: what the host offers (0 = all of it);
        ports: the range task endpoints take their ports from."""
        self.host, self.run_dir, self.advertise = host, run_dir or None, advertise
        self.ports = ports
        self._reserved: set[int] = set()
        self.spec_dir = os.path.join(state_dir, "specs")
        os.makedirs(self.spec_dir, mode=0o755, exist_ok=True)   # task processes (owners) read them
        self.memory_bytes = memory_bytes or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        self._counts: dict[str, collections.deque] = {}     # task -> (time, pid, requests)
        self._lock = threading.Lock()

    def _client(self, timeout_s: float) -> Client:
        return Client(self.run_dir, timeout_s=timeout_s)

    def pid(self) -> int:
        return os.getpid()

    # -- reports ---------------------------------------------------------------------------------

    def report(self) -> HostReport:
        """The host now. Raises (typed) when its fmplexd does not answer within a second."""
        with self._client(REPORT_TIMEOUT_S) as c:
            info = c.control(Info(ref=c.ref()))
            stats = c.control(ListTasks(ref=c.ref())).tasks
            mine = [s for s in stats if os.path.exists(self._spec_path(s.name))]
            slots = {r.name[len("slot:"):]: r.bytes for r in info.regions if r.kind == "slot"}
            replicas = []
            for s in mine:
                address = key = ""
                try:
                    ep = c.control(Resolve(ref=c.ref(), name=s.name))
                    address, key = ep.tcp_endpoint, ep.server_key
                except FmplexError as e:
                    if e.code is not ErrorCode.TASK_UNAVAILABLE:
                        raise
                replicas.append(ReplicaReport(
                    task=s.name, state=s.state, pid=s.pid, address=address, server_key=key,
                    rate=self._rate(s.name, s.pid, s.requests, s.rate), p99_ms=s.p99_ms,
                    queued=s.queued, slot_bytes=slots.get(s.name, 0)))
        return HostReport(host=self.host, epoch=info.epoch, memory_bytes=self.memory_bytes,
                          used_bytes=sum(r.bytes for r in info.regions),
                          backbones=tuple((b.name, b.region_bytes) for b in info.backbones),
                          replicas=tuple(replicas))

    def _rate(self, task: str, pid: int, requests: int, daemon_rate: float) -> float:
        """Completed requests per second over the last RATE_WINDOW_S (the daemon's rate until
        there are two samples of one process)."""
        now = time.monotonic()
        with self._lock:
            q = self._counts.setdefault(task, collections.deque())
            if q and q[-1][1] != pid:
                q.clear()
            q.append((now, pid, requests))
            while len(q) > 2 and now - q[1][0] >= RATE_WINDOW_S:
                q.popleft()
            if len(q) < 2 or now - q[0][0] < 0.5:
                return daemon_rate
            return max(0.0, (q[-1][2] - q[0][2]) / (now - q[0][0]))

    # -- actions ---------------------------------------------------------------------------------

    def deploy(self, name: str, spec: str, spec_dir: str) -> str:
        """Deploy the task here; returns its tcp:// endpoint once it serves. A task already
        deployed here counts as deployed. Raises AgentError."""
        port = self._port(name)
        try:
            tcp = f"tcp://{self.advertise}:{port}"
            path = self._spec_path(name)
            with open(path + ".tmp", "w") as f:
                f.write(host_spec(spec, spec_dir, tcp))
            os.replace(path + ".tmp", path)
            with open(path) as f:
                text = f.read()
            with self._client(DEPLOY_TIMEOUT_S) as c:
                c.control(Deploy(ref=c.ref(), spec=text, spec_path=path),
                          timeout_s=DEPLOY_TIMEOUT_S)
        except FmplexError as e:
            if e.code is not ErrorCode.CONFLICT:
                raise AgentError(f"deploy {name} on {self.host}: {e}") from None
        finally:
            with self._lock:
                self._reserved.discard(port)
        return tcp

    def remove(self, name: str) -> bool:
        """Stop and forget the task here; False if it was not running. Raises AgentError."""
        try:
            with self._client(30.0) as c:
                c.control(RemoveTask(ref=c.ref(), name=name))
            found = True
        except FmplexError as e:
            if e.code is not ErrorCode.UNKNOWN_TASK:
                raise AgentError(f"remove {name} on {self.host}: {e}") from None
            found = False
        try:
            os.unlink(self._spec_path(name))
        except FileNotFoundError:
            pass
        with self._lock:
            self._counts.pop(name, None)
        return found

    # -- helpers ---------------------------------------------------------------------------------

    def _spec_path(self, name: str) -> str:
        return os.path.join(self.spec_dir, f"{name}.toml")

    def _spec_port(self, name: str) -> int | None:
        try:
            with open(self._spec_path(name), "rb") as f:
                tcp = tomllib.load(f).get("endpoint", {}).get("tcp", "")
            if tcp.startswith(f"tcp://{self.advertise}:"):
                return int(tcp.rsplit(":", 1)[1])
        except (OSError, ValueError, tomllib.TOMLDecodeError):
            pass
        return None

    def _port(self, name: str) -> int:
        """The port of the task's endpoint: the one its spec already has, else the first free
        one of the range (reserved until its deploy ends)."""
        with self._lock:
            port = self._spec_port(name)
            if port is None:
                taken = self._reserved | {self._spec_port(f[:-5]) for f in os.listdir(self.spec_dir)
                                          if f.endswith(".toml")}
                port = next((p for p in range(self.ports[0], self.ports[1] + 1)
                             if p not in taken and _bindable(self.advertise, p)), None)
                if port is None:
                    raise AgentError(f"no free port in {self.ports} on {self.host}")
            self._reserved.add(port)
            return port


def _bindable(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False

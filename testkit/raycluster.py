"""A real multi-host fmplex cluster on one machine, for tests and benchmarks: a local Ray cluster
(ray.cluster_utils.Cluster) whose nodes are the hosts, each with its own real fmplexd, all on
loopback. Importing this module sets Ray's environment for such a cluster (before Ray is imported
anywhere): loopback nodes (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, else a driver rewrites 127.0.0.1
to the machine's address and hangs), no token authentication (newer Ray turns it on by default),
no usage statistics, and no silent start of a private Ray instance by a stray call.

    with LocalCluster(["n0", "n1", "n2"], backbones={"default": tiny}) as lc:
        lc.start_controller()                       # the detached controller, keys, config
        with lc.client() as c: c.infer(...)         # fmplex.Client(cluster=...)
        lc.kill_host("n2")                          # SIGKILL its raylet, fmplexd and their trees
        lc.add_host("n2")                           # a fresh node and fmplexd under that name

Failure detection is tuned (health checks every 500 ms, 3 misses: a killed node is declared dead
in about 1.5 s instead of 12 s). Every process started here is stopped by `close`, which then
checks that none is left (`leftovers`). The cluster costs about 1 GiB and 10-20 s to start on a
2-core machine: start it once per test module.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_AUTO_CONNECT": "0", "RAY_DEDUP_LOGS": "0"}
if "ray" in sys.modules and any(k not in os.environ for k in RAY_ENV):
    # Ray reads these when it is imported; too late now (a driver would hang on 127.0.0.1).
    raise ImportError("import testkit.raycluster before ray")
for _k, _v in RAY_ENV.items():
    os.environ.setdefault(_k, _v)

import psutil  # noqa: E402
import zmq  # noqa: E402
import zmq.auth  # noqa: E402

from testkit.launch import DaemonProcess, short_tmpdir  # noqa: E402

LABEL = "fmplex-host"
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
RAY_NAMES = ("raylet", "gcs_server", "ray::", "/ray/", "fmplexd.main", "tasklets")
PORT_BASE = 21000             # host i's task endpoints: PORT_BASE + 200 i .. + 199 (one machine)


def keypair() -> tuple[str, str]:
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def certificate(directory: str, name: str) -> tuple[str, str]:
    """A key pair written as ZeroMQ certificates (as `fmplex cluster keygen` does); returns its
    (public, secret) Z85 keys."""
    from cluster.config import read_cert
    zmq.auth.create_certificates(directory, name)
    return read_cert(os.path.join(directory, f"{name}.key_secret"), secret=True)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, hosts: list[str], backbones: dict[str, str], daemon_config: str = "",
                 host_backbones: dict[str, dict[str, str]] | None = None):
        """hosts: names (the first is the head); backbones: {name: path} every fmplexd holds,
        unless host_backbones names a host's own."""
        self.names = list(hosts)
        self.backbones, self.host_backbones = backbones, host_backbones or {}
        self.daemon_config = daemon_config
        self.dir = short_tmpdir("fmx-cl-")
        self.ray_cluster = None
        self.session_dir = ""
        self.nodes: dict[str, object] = {}
        self.daemons: dict[str, DaemonProcess] = {}
        self.certs = os.path.join(self.dir, "certs")
        os.makedirs(self.certs)
        self.client_keys = certificate(self.certs, "client")
        self.operator_keys = certificate(self.certs, "operator")
        self.server_keys = certificate(self.certs, "server")
        self.config = None

    # -- life ------------------------------------------------------------------------------------

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        from ray.cluster_utils import Cluster
        daemons = threading.Thread(target=self._start_daemons, args=(self.names,))
        daemons.start()
        head, *workers = self.names
        self.ray_cluster = Cluster(initialize_head=True, head_node_args=dict(
            node_ip_address="127.0.0.1", num_cpus=1, labels={LABEL: head}, include_dashboard=False,
            _system_config=dict(FAST_FAILURE_DETECTION)))
        self.nodes[head] = self.ray_cluster.head_node
        self.session_dir = self.ray_cluster.head_node.get_session_dir_path()
        for name in workers:
            self.nodes[name] = self._add_node(name)
        self.ray_cluster.wait_for_nodes()
        self.ray_cluster.connect(namespace="fmplex")
        daemons.join()
        missing = [n for n in self.names if n not in self.daemons]
        if missing:
            raise RuntimeError(f"fmplexd of {missing} did not start")

    def _add_node(self, name: str):
        return self.ray_cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1,
                                         labels={LABEL: name})

    def _host_dir(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _start_daemons(self, names: list[str]) -> None:
        def one(name):
            os.makedirs(os.path.join(self._host_dir(name), "fmplexd"))
            d = DaemonProcess(self.host_backbones.get(name, self.backbones), self.daemon_config,
                              workdir=os.path.join(self._host_dir(name), "fmplexd"), threads=1)
            d.start()
            self.daemons[name] = d
        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def cluster_config(self, **overrides):
        from cluster.config import ClusterConfig
        from cluster.placement import Params
        kw = dict(
            bind=f"tcp://127.0.0.1:{free_port()}",
            server_public=self.server_keys[0], server_secret=self.server_keys[1],
            operator_keys=(self.operator_keys[0],), client_keys=(self.client_keys[0],),
            host_label=LABEL, controller_host=self.names[0],
            run_dirs=tuple((n, os.path.join(self._host_dir(n), "fmplexd", "run"))
                           for n in self.names),
            state_dirs=tuple((n, os.path.join(self._host_dir(n), "agent")) for n in self.names),
            host_ports=tuple((n, (PORT_BASE + 200 * i, PORT_BASE + 200 * i + 199))
                             for i, n in enumerate(self.names)),
            tick_s=0.25, agent_timeout_s=2.0, request_resources=False,
            placement=Params(move_cost=float("inf")))
        kw.update(overrides)
        return ClusterConfig(**kw)

    def start_controller(self, **overrides):
        from cluster import launch
        self.config = self.cluster_config(**overrides)
        return launch.start(self.config)

    def controller(self):
        from cluster import launch
        return launch.find()

    def snapshot(self):
        import ray
        return ray.get(self.controller().snapshot.remote(), timeout=60)

    def restart_controller(self) -> None:
        """Kill the controller's process; Ray starts it again (asynchronously)."""
        import ray
        ray.kill(self.controller(), no_restart=False)

    def wait(self, predicate, timeout_s: float, what: str):
        """Poll the controller's snapshot until predicate(snapshot) holds; returns that one."""
        deadline = time.monotonic() + timeout_s
        while True:
            snap = self.snapshot()
            if predicate(snap):
                return snap
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout_s}s; last snapshot {snap}")
            time.sleep(0.1)   # a poll interval between controller calls, not a wait for an event

    # -- clients ---------------------------------------------------------------------------------

    def client(self, timeout_s: float = 30.0, keys: tuple[str, str] | None = None):
        from fmplex.client import Client
        return Client(cluster=self.config.bind, cluster_key=self.server_keys[0],
                      keypair=keys or self.client_keys, timeout_s=timeout_s)

    def cli_env(self, who: str = "operator") -> dict[str, str]:
        """The environment `fmplex cluster ...` needs, as `who` (operator or client)."""
        return {"FMPLEX_CLUSTER": self.config.bind,
                "FMPLEX_CLUSTER_KEY": os.path.join(self.certs, "server.key"),
                "FMPLEX_CLUSTER_CERT": os.path.join(self.certs, f"{who}.key_secret")}

    def operator(self):
        """A Router with the operator's keys (for cluster_deploy and friends)."""
        from fmplex.routing import ClusterAccess, Router
        ctx = zmq.Context.instance()
        return Router(ctx, ClusterAccess(self.config.bind, self.server_keys[0],
                                         *self.operator_keys), link=None)

    # -- faults ----------------------------------------------------------------------------------

    def kill_host(self, name: str) -> float:
        """SIGKILL the host's raylet and fmplexd with everything under them (Ray workers, its
        agent, the task zygote and task processes), as if the machine died. Returns the
        monotonic time of the kill."""
        procs = []
        for infos in self.nodes[name].all_processes.values():
            for info in infos:
                procs += _tree(info.process.pid)
        procs += _tree(self.daemons[name].proc.pid)
        t = time.monotonic()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.daemons[name].proc.wait()
        self.ray_cluster.remove_node(self.nodes.pop(name), allow_graceful=False)
        self.daemons.pop(name).cleanup()
        return t

    def add_host(self, name: str) -> None:
        """A fresh host under that name: an empty disk, a new fmplexd, a new Ray node."""
        shutil.rmtree(self._host_dir(name), ignore_errors=True)
        self._start_daemons([name])
        self.nodes[name] = self._add_node(name)
        self.ray_cluster.wait_for_nodes()

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop everything; returns what is left (should be [])."""
        import ray
        try:
            if ray.is_initialized():
                from cluster import launch
                launch.stop(forget=True)
        except Exception:
            pass
        if ray.is_initialized():
            ray.shutdown()
        if self.ray_cluster is not None:
            self.ray_cluster.shutdown()
            self.ray_cluster = None
        for d in list(self.daemons.values()):
            d.cleanup()
        self.daemons.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.session_dir:                          # Ray's logs of this cluster (/tmp/ray/...)
            shutil.rmtree(self.session_dir, ignore_errors=True)
        left = leftovers()
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        return [f"{p.pid} {p.info.get('name')}" for p in left]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return []


def leftovers() -> list[psutil.Process]:
    """Ray and fmplex processes still alive in this process's session or below it."""
    me, sid = os.getpid(), os.getsid(0)
    mine = {p.pid for p in psutil.Process(me).children(recursive=True)}
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if p.pid == me or (p.pid not in mine and os.getsid(p.pid) != sid):
                continue
            line = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
            if any(n in line for n in RAY_NAMES) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out

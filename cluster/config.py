"""The cluster's configuration (TOML), read once by whoever starts the controller, then passed to
it (and by it to the agents) as one frozen object. Keys are read from ZeroMQ certificate files
(`fmplex cluster keygen`) at load time, so the controller never needs the operator's files.

    bind = "tcp://0.0.0.0:7400"            # the controller's service (routes, operator commands)
    server_cert = "/etc/fmplex/cluster.key_secret"     # its CURVE key pair (secret certificate)
    operator_certs = ["/etc/fmplex/operators/alice.key"] # public certificates of operators
    client_certs = ["/etc/fmplex/clients/app.key"]      # public certificates allowed to resolve
    host_label = "fmplex-host"             # Ray node label: its value names the host
    controller_host = ""                   # the host the controller must run on ("" = the head:
                                           # with bind's fixed port, clients always find it)
    run_dir = ""                           # each host's fmplexd run directory ("" = its default)
    state_dir = "/var/lib/fmplex/cluster"  # each host's agent keeps its task specs here
    advertise = ""                         # the address task endpoints bind and publish
                                           # ("" = the host's Ray node IP)
    ports = [20000, 29999]                 # task endpoints' ports (keep clear of the kernel's
                                           # ephemeral range, net.ipv4.ip_local_port_range)
    host_memory_bytes = 0                  # memory a host offers (0 = its physical memory)
    tick_s = 0.5                           # reconcile period
    agent_timeout_s = 2.0                  # a report slower than this keeps the last one
    default_cost_ms = 10.0                 # device time per request, for backbones not listed
    request_resources = true               # ask Ray's autoscaler for hosts when replicas lack room
    [cost_ms]                              # device time per request, by backbone
    default = 12.0
    [run_dirs]                             # per-host run directories (tests: many on one machine)
    n1 = "/tmp/fmx-n1/run"
    [host_ports]                           # per-host port ranges (same)
    n1 = [21000, 21999]
    [placement]                            # cluster.placement.Params
    max_utilization = 0.85
    move_cost = 0.5
    [scaling]                              # cluster.autoscale.ScalePolicy
    up_after = 3
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields

from cluster.autoscale import ScalePolicy
from cluster.placement import Params

CONTROLLER_NAME = "fmplex-controller"
NAMESPACE = "fmplex"


def agent_name(host: str) -> str:
    return f"fmplex-agent-{host}"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    bind: str = "tcp://0.0.0.0:7400"
    server_secret: str = ""                       # Z85 CURVE secret key of the service
    server_public: str = ""
    operator_keys: tuple[str, ...] = ()           # Z85 public keys
    client_keys: tuple[str, ...] = ()
    host_label: str = "fmplex-host"
    controller_host: str = ""
    run_dir: str = ""
    run_dirs: tuple[tuple[str, str], ...] = ()    # (host, run dir) overrides
    state_dir: str = "/var/lib/fmplex/cluster"
    state_dirs: tuple[tuple[str, str], ...] = ()  # (host, state dir) overrides
    advertise: str = ""
    ports: tuple[int, int] = (20000, 29999)
    host_ports: tuple[tuple[str, tuple[int, int]], ...] = ()
    host_memory_bytes: int = 0
    tick_s: float = 0.5
    agent_timeout_s: float = 2.0
    default_cost_ms: float = 10.0
    cost_ms: tuple[tuple[str, float], ...] = ()
    request_resources: bool = True
    placement: Params = field(default_factory=Params)
    scaling: ScalePolicy = field(default_factory=ScalePolicy)

    def __post_init__(self):
        if not self.bind.startswith("tcp://"):
            raise ValueError(f"bind must be a tcp:// address, not {self.bind!r}")
        if not (self.server_secret and self.server_public):
            raise ValueError("the service needs its CURVE key pair (server_cert)")
        if self.tick_s <= 0 or self.agent_timeout_s <= 0:
            raise ValueError("tick_s and agent_timeout_s must be > 0")

    def run_dir_of(self, host: str) -> str:
        return dict(self.run_dirs).get(host, self.run_dir)

    def ports_of(self, host: str) -> tuple[int, int]:
        return dict(self.host_ports).get(host, self.ports)

    def state_dir_of(self, host: str) -> str:
        return dict(self.state_dirs).get(host, os.path.join(self.state_dir, host))

    def cost_s(self, backbone: str) -> float:
        return dict(self.cost_ms).get(backbone, self.default_cost_ms) / 1e3


def load_cluster_config(path: str | None, **overrides) -> ClusterConfig:
    """Read the TOML file (or nothing) and apply keyword overrides (already in ClusterConfig's
    terms, e.g. server_secret=...); certificate files are read here."""
    data: dict = {}
    if path:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    kw: dict = {}
    plain = {f.name for f in fields(ClusterConfig)} - {
        "server_secret", "server_public", "operator_keys", "client_keys", "run_dirs",
        "state_dirs", "cost_ms", "placement", "scaling", "ports", "host_ports"}
    unknown = set(data) - plain - {"server_cert", "operator_certs", "client_certs", "run_dirs",
                                   "state_dirs", "cost_ms", "placement", "scaling", "ports",
                                   "host_ports"}
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {sorted(unknown)}")
    kw.update({k: v for k, v in data.items() if k in plain})
    if "server_cert" in data:
        kw["server_public"], kw["server_secret"] = read_cert(data["server_cert"], secret=True)
    for key, certs in (("operator_keys", "operator_certs"), ("client_keys", "client_certs")):
        kw[key] = tuple(read_cert(p)[0] for p in data.get(certs, ()))
    for key in ("run_dirs", "state_dirs", "cost_ms"):
        kw[key] = tuple(sorted(data.get(key, {}).items()))
    if "ports" in data:
        kw["ports"] = tuple(data["ports"])
    kw["host_ports"] = tuple(sorted((h, tuple(r)) for h, r in data.get("host_ports", {}).items()))
    kw["placement"] = Params(**data.get("placement", {}))
    kw["scaling"] = ScalePolicy(**data.get("scaling", {}))
    kw.update(overrides)
    return ClusterConfig(**kw)


def read_cert(path: str, secret: bool = False) -> tuple[str, str]:
    """(public, secret) Z85 keys of a ZeroMQ certificate file (secret "" for a public one)."""
    import zmq.auth
    public, sec = zmq.auth.load_certificate(path)
    if secret and not sec:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file)")
    return public.decode(), (sec or b"").decode()

"""What an agent reports about its host, and what the controller wants: plain frozen records.

They travel between Ray actors (Ray's own serialization: the control plane, never fmplex's
sockets). The operator's intent is kept as the ClusterDeploy message that asked for it, so it is
stored with the one codec (cluster/store.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from ipc.messages import ClusterDeploy, TaskState
from ipc.spec import TaskSpec


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """One cluster task process on a host, as its fmplexd sees it."""
    task: str
    state: TaskState
    pid: int
    address: str                 # its tcp:// endpoint ("" before it registered)
    server_key: str              # its CURVE public key
    rate: float                  # completed requests per second (daemon's recent window)
    p99_ms: float                # daemon-side latency of its recent requests
    queued: int
    slot_bytes: int

    @property
    def serving(self) -> bool:
        return self.state is TaskState.READY and bool(self.address) and len(self.server_key) == 40


@dataclass(frozen=True, slots=True)
class HostReport:
    host: str
    epoch: int                   # the fmplexd's incarnation (a restarted daemon has another)
    memory_bytes: int            # what the host offers
    used_bytes: int              # its backbones' and slots' regions
    backbones: tuple[tuple[str, int], ...]       # (name, bytes) the fmplexd holds
    replicas: tuple[ReplicaReport, ...]

    def replica(self, task: str) -> ReplicaReport | None:
        return next((r for r in self.replicas if r.task == task), None)


@dataclass(frozen=True, slots=True)
class Desired:
    """A task the operator deployed, with its spec parsed once."""
    deploy: ClusterDeploy
    spec: TaskSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def slo_s(self) -> float:
        return (self.deploy.slo_ms or self.spec.deadline_ms) / 1e3

"""The three ways of hosting the same tasks on the same fleet, each a Deployment: what runs on which
device (servers) and which tasks found no room.

  one instance per task  each task is its own model instance: a private copy of its backbone with
                         its LoRA merged, its own runtime (and KV pool), and a fixed equal share
                         of its device's compute (spatial partitioning, as MIG/MPS or the serving
                         benchmark's CFS quota); instances are packed first-fit, most popular
                         first, while memory lasts and every instance on the device still meets
                         its SLO (by the placement's latency model) at its shrunk share.
  MuxServe-style         the same private instances, placed by the real placement function
                         (cluster/placement.py) with every task its own "backbone": popularity x
                         cost, candidate splits; a device's compute is multiplexed among its
                         models as they need it (work-conserving), batches within one model.
  fmplex                 the real placement function with the real backbones: one copy per
                         backbone per device shared by its tasks, a task costs its slot (and on
                         a CPU host its process); batches span every task of a backbone, paying
                         the LoRA segments' measured share of the forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.clustersim.fleet import KV_SEQUENCES, LORA_SHARE, Fleet
from bench.clustersim.trace import SimTask
from cluster.placement import HostSpec, Params, TaskDemand, place

MAX_UTILIZATION = 0.85
PLACEMENT = Params(max_utilization=MAX_UTILIZATION, move_cost=math.inf)


@dataclass(slots=True)
class Server:
    """One queue of a device: its compute units, how it batches, its tasks."""
    device: int
    speed: float                 # compute units: a share of the device, or the whole of it
    group_by: str                # "task": batches of one task; "backbone": of one backbone
    lora: float                  # per-token cost factor (fmplex's segmented LoRA)
    tasks: list[SimTask] = field(default_factory=list)


@dataclass(slots=True)
class Deployment:
    policy: str
    servers: list[Server]
    unplaced: int


def compute_units(fleet: Fleet, policy: str) -> float:
    """A device's compute for model work: a GPU; on a 2-core CPU host one core (one forward at a
    time at the measured single-thread speed), the other left to the request path of whatever
    serves (fmplex's task processes, the instances' servers), for every policy alike."""
    return 1.0


def batch_size(t: SimTask, group_rate: float, fleet: Fleet) -> float:
    """Requests per batch when its batching group sees group_rate requests/s: about those that
    arrive during one batch-1 time, at least 1, at most the batch limit."""
    limit = fleet.batch_limit(t.backbone) / t.backbone.tokens
    return min(max(group_rate * t.backbone.batch1_s(fleet.gpu), 1.0), limit)


def demand(t: SimTask, group_rate: float, fleet: Fleet, lora: float = 1.0,
           backbone: str = "") -> TaskDemand:
    """The placement's view of a task. An encoder: device-seconds per request with the fixed part
    shared by its batch, its own batch-1 time, a hold of one batch. A decoder (continuous
    batching: a device that generates for a few sequences has room for more almost free): its
    share of a full KV pool's generation as its cost, that generation's time as its own latency,
    a hold of one iteration."""
    b = t.backbone
    fixed, per_token = b.cost(fleet.gpu)
    if b.kind == "decoder" and fleet.gpu:
        full = fixed + per_token * b.tokens * KV_SEQUENCES * lora
        cost, own, hold = full / KV_SEQUENCES, full, b.chunk_s(True, KV_SEQUENCES)
    else:
        batch = batch_size(t, group_rate, fleet)
        cost, own = fixed / batch + per_token * b.tokens * lora, b.batch1_s(fleet.gpu)
        hold = b.chunk_s(fleet.gpu, batch)
    return TaskDemand(t.name, backbone or t.name, t.rate, cost,
                      fleet.task_bytes(b) if backbone else 0, t.slo_s, latency_s=own, chunk_s=hold)


def one_instance(fleet: Fleet, tasks: list[SimTask]) -> Deployment:
    units = compute_units(fleet, "one instance")
    devices: list[list[SimTask]] = [[] for _ in range(fleet.devices)]
    used = [0] * fleet.devices
    unplaced = 0
    for t in sorted(tasks, key=lambda t: -t.rate):
        need = t.backbone.instance_bytes(fleet.gpu)
        for d in range(fleet.devices):
            fits = used[d] + need <= fleet.device_bytes
            if fits and _partition_ok(devices[d] + [t], units, fleet):
                devices[d].append(t)
                used[d] += need
                break
        else:
            unplaced += 1
    servers = [Server(d, units / len(ts), "task", 1.0, [t]) for d, ts in enumerate(devices)
               for t in ts]
    return Deployment("one instance per task", servers, unplaced)


def _partition_ok(tasks: list[SimTask], units: float, fleet: Fleet) -> bool:
    """Every instance meets its SLO at a share units / len(tasks), by placement's model (an
    instance alone in its share: its own hold, stretched by its load)."""
    share = units / len(tasks)
    for t in tasks:
        d = demand(t, t.rate, fleet)
        rho = t.rate * d.cost_s / share
        if rho > MAX_UTILIZATION:
            return False
        wait = d.hold_s / share / (1 - rho) if rho > 0.01 else 0.0
        if d.own_s / share + wait > t.slo_s:
            return False
    return True


def muxserve(fleet: Fleet, tasks: list[SimTask]) -> Deployment:
    units = compute_units(fleet, "muxserve")
    demands = [demand(t, t.rate, fleet) for t in tasks]
    sizes = {t.name: t.backbone.instance_bytes(fleet.gpu) for t in tasks}
    return _deploy("MuxServe-style", fleet, tasks, demands, sizes, units, "task", 1.0, 0)


def fmplex(fleet: Fleet, tasks: list[SimTask]) -> Deployment:
    units = compute_units(fleet, "fmplex")
    lora = 1 / (1 - LORA_SHARE)
    per_backbone: dict[str, float] = {}
    for t in tasks:
        per_backbone[t.backbone.name] = per_backbone.get(t.backbone.name, 0.0) + t.rate
    demands = [demand(t, per_backbone[t.backbone.name] / fleet.devices, fleet, lora,
                      backbone=t.backbone.name) for t in tasks]
    sizes = {b.name: b.copy_bytes(fleet.gpu) for b in fleet.backbones()}
    return _deploy("fmplex", fleet, tasks, demands, sizes, units, "backbone", lora,
                   fleet.daemon_bytes())


def _deploy(policy, fleet, tasks, demands, sizes, units, group_by, lora, reserved) -> Deployment:
    hosts = [HostSpec(f"d{i:02d}", fleet.device_bytes - reserved, speed=units, can_load=True)
             for i in range(fleet.devices)]
    plan = place(demands, hosts, {}, sizes, PLACEMENT)
    by_name = {t.name: t for t in tasks}
    servers = {h.name: Server(i, units, group_by, lora) for i, h in enumerate(hosts)}
    for name, where in plan.placement.items():
        servers[where[0]].tasks.append(by_name[name])
    return Deployment(policy, [s for s in servers.values() if s.tasks], len(plan.unplaced))


POLICIES = (one_instance, muxserve, fmplex)

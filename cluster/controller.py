"""The controller: keeps the cluster as the operator asked, as a detached, named, restartable Ray
actor (`fmplex-controller`, started by cluster/launch.py).

Every tick (config.tick_s) one reconcile, a few named steps:
  observe   the live Ray nodes with the host label are the hosts; each gets its agent
            (cluster/membership.py); every agent is asked for its report, all in parallel, each
            waited for at most agent_timeout_s (a slow one keeps its last report). A host is lost
            when its node died, its agent died or its fmplexd stopped answering.
  scale     per task, the autoscaler (cluster/autoscale.py) turns the reports' rates and
            latencies into the replicas wanted.
  place     the pure policy (cluster/placement.py), from the actual placement: the replicas the
            reports show plus the deploys under way.
  act       deploys start without blocking the tick; a replica to remove first leaves the route
            table and is removed DRAIN_S later (clients drop it from their caches meanwhile),
            and a relocated one only once enough replicas serve elsewhere (make before break).
            Replicas the policy could not place ask Ray's autoscaler for hosts (request_resources).
  publish   the route table: every serving replica on a live host that is not draining; its
            version grows only when its content changes.

Restart: the actor's process may die or be killed at any time; Ray starts it again and __init__
runs anew. The durable part (deploys, replicas wanted, the table's version and digest) is in the
GCS (cluster/store.py); everything else is rebuilt from the agents, which live on. Nothing is
placed and no table is published until every live host has answered once (STARTUP_WAIT_S at
most), so a restarted controller starts from the whole picture: if the cluster was as it should
be, it deploys nothing, removes nothing, and publishes the same table under the same version.

Operator commands (deploy, remove, status) arrive on the service thread (cluster/service.py) and
only change the desired state, under a lock; the next tick does the rest.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import ray

from cluster import membership
from cluster.autoscale import Observation, ScaleState, scale
from cluster.config import ClusterConfig
from cluster.placement import HostSpec, Plan, TaskDemand, place
from cluster.reports import Desired, HostReport
from cluster.service import Routes, Service
from cluster.specs import read_spec
from cluster.store import Store
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import (ClusterDeploy, ClusterRemove, ClusterStatus, ClusterStatusReply,
                          ClusterTask, HostStatus, Message, Ok, RouteEndpoint, TaskState)

log = logging.getLogger("fmplex.cluster.controller")
DRAIN_S = 2.5                    # > the clients' route cache (fmplex.routing.ROUTE_TTL_S)
DEPLOY_BACKOFF_S = 5.0           # after a failed deploy, before the task is placed again
SETTLE_S = 10.0                  # a finished deploy or removal counts until a report shows it
STARTUP_WAIT_S = 20.0            # a (re)started controller waits this long at most for every host
PLACED_STATES = (TaskState.READY, TaskState.WAITING, TaskState.DEAD)   # DEAD: fmplexd restarts it
MIN_TASK_BYTES = 16 << 20        # a task process and its slot, when nothing better is known


@dataclass(slots=True)
class Counters:
    """What this incarnation did (for `snapshot`, tests and status)."""
    ticks: int = 0
    deploys: int = 0
    removes: int = 0
    lost: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class View:
    """What the last tick saw and decided, for readers on other threads (replaced whole)."""
    reports: dict[str, HostReport]
    serving: dict[str, tuple[str, ...]]        # task -> hosts where it serves (routed)
    wanted: dict[str, int]
    utilization: dict[str, float]              # host -> estimated from rates x costs


@dataclass(frozen=True, slots=True)
class Snapshot:
    pid: int                                   # the controller's process (a restart changes it)
    ready: bool
    ticks: int
    deploys: int
    removes: int
    version: int
    placement: dict[str, tuple[str, ...]]      # task -> hosts where it serves
    wanted: dict[str, int]
    hosts: tuple[str, ...]
    lost: tuple[str, ...]
    service: str


class Controller:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.store = Store()
        self._lock = threading.Lock()
        self.desired = {}
        for name, msg in self.store.tasks().items():
            try:
                self.desired[name] = Desired(msg, read_spec(msg.spec, msg.spec_dir))
            except FmplexError as e:
                log.warning("dropping the stored deploy of %s: %s", name, e)
        self.scales = {n: ScaleState(w) for n, w in self.store.wanted().items()}
        self.version, self.digest = self.store.version()
        self.agents: dict[str, object] = {}
        self.reports: dict[str, HostReport] = {}
        self.asked: dict[str, object] = {}                    # host -> report call in flight
        self.heard: set[str] = set()                          # hosts whose report call ended
        self.started = time.monotonic()
        self.deploying: dict[tuple[str, str], object] = {}    # (task, host) -> deploy call
        self.draining: dict[tuple[str, str], float] = {}      # (task, host) -> remove at
        self.settling: dict[tuple[str, str], tuple[bool, float]] = {}   # -> (present, until)
        self.backoff: dict[str, float] = {}
        self.seen: dict[tuple[str, str], float] = {}          # (task, host) -> first seen
        self.requested = 0
        self.ready = False
        self.counters = Counters()
        self.view = View({}, {}, {}, {})
        self.service = Service(config.bind, config.server_public, config.server_secret,
                               config.operator_keys, config.client_keys, self.operate)
        self.service.start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fmplex-reconcile", daemon=True)
        self._thread.start()

    # -- actor methods ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        view = self.view
        return Snapshot(pid=os.getpid(), ready=self.ready, ticks=self.counters.ticks,
                        deploys=self.counters.deploys, removes=self.counters.removes,
                        version=self.version,
                        placement=dict(view.serving), wanted=dict(view.wanted),
                        hosts=tuple(sorted(view.reports)), lost=tuple(self.counters.lost),
                        service=self.config.bind)

    def stop(self, remove_agents: bool = True) -> None:
        """Stop reconciling and serving (the cluster is being torn down)."""
        self._stop.set()
        self._thread.join(30)
        self.service.close()
        if remove_agents:
            membership.kill_agents(list(self.agents))

    # -- operator commands (service thread) ------------------------------------------------------

    def operate(self, msg: Message) -> Message:
        if isinstance(msg, ClusterDeploy):
            spec = read_spec(msg.spec, msg.spec_dir)
            if msg.min_replicas > msg.max_replicas:
                raise FmplexError(ErrorCode.INVALID_INPUT, "min_replicas > max_replicas")
            with self._lock:
                if spec.name in self.desired:
                    raise FmplexError(ErrorCode.CONFLICT, f"task {spec.name} is already deployed")
                self.store.put_task(spec.name, msg)
                self.desired[spec.name] = Desired(msg, spec)
            return Ok(ref=msg.ref, message=f"task {spec.name} accepted")
        if isinstance(msg, ClusterRemove):
            with self._lock:
                if self.desired.pop(msg.name, None) is None:
                    raise FmplexError(ErrorCode.UNKNOWN_TASK,
                                      f"the cluster runs no task {msg.name}")
                self.scales.pop(msg.name, None)
                self.store.drop_task(msg.name)
            return Ok(ref=msg.ref, message=f"removing {msg.name}")
        if isinstance(msg, ClusterStatus):
            return self._status(msg.ref)
        raise FmplexError(ErrorCode.UNEXPECTED, msg.TYPE)

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("reconcile failed; trying again next tick")

    def tick(self) -> None:
        now = time.monotonic()
        nodes = membership.live_hosts(self.config.host_label)
        self._observe(nodes)
        if not self.ready:                               # wait for the whole picture (a host
            patience = now - self.started < STARTUP_WAIT_S  # silent that long counts as lost)
            if patience and any(h not in self.heard for h in nodes):
                return
            self.ready = True
        self._settle()
        with self._lock:
            desired = dict(self.desired)
        actual = self._actual()
        wanted = self._scale(desired, now)
        plan = place(self._demands(desired, wanted), self._hosts(), actual,
                     params=self.config.placement)
        self._act(plan, desired, now)
        self._publish(desired, wanted)
        self.counters.ticks += 1

    # -- observe ---------------------------------------------------------------------------------

    def _observe(self, nodes: dict[str, membership.Node]) -> None:
        for host in [h for h in self.reports if h not in nodes]:
            self._lose(host, "its Ray node is gone")
        for host, node in nodes.items():
            if host not in self.agents:
                self.agents[host] = membership.agent(self.config, node)
            if host not in self.asked:
                self.asked[host] = self.agents[host].report.remote()
        refs = list(self.asked.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.config.agent_timeout_s)
        done = set(ready)
        for host, ref in list(self.asked.items()):
            if ref not in done:
                continue
            del self.asked[host]
            self.heard.add(host)
            try:
                self.reports[host] = ray.get(ref)
            except ray.exceptions.RayActorError:
                self.agents.pop(host, None)
                self._lose(host, "its agent died")
            except Exception as e:
                self._lose(host, f"its fmplexd does not answer ({e})")

    def _lose(self, host: str, why: str) -> None:
        if self.reports.pop(host, None) is not None:
            log.warning("host %s is lost: %s", host, why)
            self.counters.lost.append(host)
        for table in (self.seen, self.deploying, self.draining, self.settling):
            for key in [k for k in table if k[1] == host]:
                del table[key]

    def _settle(self) -> None:
        """Deploys that finished: a success counts as placed until a report shows it, a failure
        backs its task off for a while."""
        now = time.monotonic()
        refs = {ref: key for key, ref in self.deploying.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
        for ref in ready:
            key = refs[ref]
            self.deploying.pop(key, None)
            try:
                ray.get(ref)
                self.settling[key] = (True, now + SETTLE_S)
            except Exception as e:
                log.warning("deploying %s on %s failed: %s", key[0], key[1], e)
                self.backoff[key[0]] = now + DEPLOY_BACKOFF_S
        for key, (present, until) in list(self.settling.items()):
            shown = key[1] in self.reports and self.reports[key[1]].replica(key[0]) is not None
            if shown == present or until <= now:
                del self.settling[key]

    def _actual(self) -> dict[str, tuple[str, ...]]:
        """task -> hosts where a replica runs or is being deployed (oldest first), not draining."""
        now = time.monotonic()
        keys = {(r.task, h) for h, rep in self.reports.items() for r in rep.replicas
                if r.state in PLACED_STATES}
        keys |= set(self.deploying)
        keys |= {k for k, (present, _) in self.settling.items() if present}
        keys -= {k for k, (present, _) in self.settling.items() if not present}
        keys -= set(self.draining)
        for k in keys:
            self.seen.setdefault(k, now)
        out: dict[str, list[str]] = {}
        for task, host in sorted(keys, key=lambda k: (self.seen[k], k[1])):
            out.setdefault(task, []).append(host)
        return {t: tuple(hs) for t, hs in out.items()}

    # -- scale, place ----------------------------------------------------------------------------

    def _serving(self, task: str) -> list:
        return [(h, r) for h, rep in sorted(self.reports.items()) for r in rep.replicas
                if r.task == task and r.serving and (task, h) not in self.draining]

    def _wanted(self, d: Desired) -> int:
        state = self.scales.get(d.name)
        return state.wanted if state is not None else d.deploy.min_replicas

    def _scale(self, desired: dict[str, Desired], now: float) -> dict[str, int]:
        out = {}
        for name, d in desired.items():
            serving = self._serving(name)
            obs = Observation(rate=sum(r.rate for _, r in serving),
                              p99_s=max((r.p99_ms for _, r in serving), default=0.0) / 1e3,
                              replicas=len(serving), cost_s=self.config.cost_s(d.spec.backbone),
                              slo_s=d.slo_s, min_replicas=d.deploy.min_replicas,
                              max_replicas=d.deploy.max_replicas)
            before = self._wanted(d)
            state, wanted = scale(self.scales.get(name, ScaleState(before)), obs,
                                  self.config.scaling, now)
            self.scales[name] = state
            if wanted != before:
                log.info("task %s: %d -> %d replicas (rate %.1f/s, p99 %.0f ms)", name, before,
                         wanted, obs.rate, obs.p99_s * 1e3)
                self.store.put_wanted(name, wanted)
            out[name] = wanted
        return out

    def _demands(self, desired: dict[str, Desired], wanted: dict[str, int]) -> list[TaskDemand]:
        out = []
        for name, d in desired.items():
            serving = self._serving(name)
            measured = sum(r.rate for _, r in serving)
            slot = max((r.slot_bytes for _, r in serving), default=0)
            out.append(TaskDemand(
                name=name, backbone=d.spec.backbone, rate=measured if serving else d.deploy.rate,
                cost_s=self.config.cost_s(d.spec.backbone), slo_s=d.slo_s, replicas=wanted[name],
                memory=max(d.deploy.memory_bytes, slot) + MIN_TASK_BYTES))
        return out

    def _hosts(self) -> list[HostSpec]:
        return [HostSpec(name=h, memory=r.memory_bytes, held=dict(r.backbones))
                for h, r in self.reports.items()]

    # -- act -------------------------------------------------------------------------------------

    def _act(self, plan: Plan, desired: dict[str, Desired], now: float) -> None:
        for m in plan.moves:
            if m.target is not None and m.task in desired and self.backoff.get(m.task, 0) <= now:
                self._deploy(desired[m.task], m.target)
            if m.source is not None and self._may_remove(m.task, m.source, desired, plan):
                self.draining.setdefault((m.task, m.source), now + DRAIN_S)
        for key, at in list(self.draining.items()):
            if at <= now and key[1] in self.agents:
                self.agents[key[1]].remove.remote(key[0])
                self.counters.removes += 1
                del self.draining[key]
                self.seen.pop(key, None)
                self.settling[key] = (False, now + SETTLE_S)
        self._ask_for_hosts(plan)

    def _deploy(self, d: Desired, host: str) -> None:
        key = (d.name, host)
        if key in self.deploying or host not in self.agents:
            return
        self.deploying[key] = self.agents[host].deploy.remote(d.name, d.deploy.spec,
                                                              d.deploy.spec_dir)
        self.counters.deploys += 1
        log.info("deploying %s on %s", d.name, host)

    def _may_remove(self, task: str, host: str, desired: dict, plan: Plan) -> bool:
        """Make before break: a desired task leaves a host only once the replicas it keeps serve."""
        if task not in desired:
            return True
        keep = set(plan.placement.get(task, ())) - {host}
        serving = {h for h, _ in self._serving(task)}
        return keep <= serving

    def _ask_for_hosts(self, plan: Plan) -> None:
        """Replicas without room: ask Ray's autoscaler for that many more hosts (a hint; without
        an autoscaler it is only recorded in the GCS). Called again only when the number changes."""
        missing = len(plan.unplaced)
        if not self.config.request_resources or missing == self.requested:
            return
        self.requested = missing
        try:
            from ray.autoscaler.sdk import request_resources
            hosts = len(self.reports) + missing if missing else 0
            request_resources(bundles=[{"CPU": 1}] * hosts)
        except Exception as e:
            log.warning("request_resources failed: %s", e)

    # -- publish ---------------------------------------------------------------------------------

    def _publish(self, desired: dict[str, Desired], wanted: dict[str, int]) -> None:
        cost = {n: self.config.cost_s(d.spec.backbone) for n, d in desired.items()}
        load = {h: sum(r.rate * cost.get(r.task, 0.0) for r in rep.replicas)
                for h, rep in self.reports.items()}
        routes = {name: tuple(RouteEndpoint(host=h, address=r.address, server_key=r.server_key,
                                            load=load[h])
                              for h, r in self._serving(name))
                  for name in sorted(desired)}
        self.view = View(dict(self.reports),
                         {n: tuple(e.host for e in eps) for n, eps in routes.items()},
                         dict(wanted), load)
        digest = hashlib.sha1(repr(sorted(
            (t, [(e.host, e.address, e.server_key) for e in eps]) for t, eps in routes.items()
        )).encode()).hexdigest()
        if digest != self.digest:
            self.version += 1
            self.digest = digest
            self.store.put_version(self.version, digest)
        if self.service.routes is None or self.service.routes.version != self.version or \
                self.service.routes.routes != routes:
            self.service.publish(Routes(self.version, routes))

    # -- status ----------------------------------------------------------------------------------

    def _status(self, ref: int) -> ClusterStatusReply:
        """From the last tick's view (this runs on the service thread)."""
        with self._lock:
            desired = dict(self.desired)
        view = self.view
        hosts = [HostStatus(name=h, alive=True, backbones=[b for b, _ in r.backbones],
                            memory_bytes=r.memory_bytes, used_bytes=r.used_bytes,
                            load=view.utilization.get(h, 0.0), tasks=len(r.replicas))
                 for h, r in sorted(view.reports.items())]
        tasks = []
        for name, d in sorted(desired.items()):
            where = view.serving.get(name, ())
            reps = [view.reports[h].replica(name) for h in where if h in view.reports]
            tasks.append(ClusterTask(
                name=name, backbone=d.spec.backbone,
                replicas=view.wanted.get(name, d.deploy.min_replicas), hosts=list(where),
                rate=sum(r.rate for r in reps if r), slo_ms=int(d.slo_s * 1e3),
                p99_ms=max((r.p99_ms for r in reps if r), default=0.0)))
        return ClusterStatusReply(ref=ref, version=self.version, hosts=hosts, tasks=tasks)

"""Sharing-aware placement of tasks on hosts: one pure function, `place`.

No sockets, no clock, no Ray: the controller calls it every reconcile with what the hosts report,
the simulator (bench/cluster_sim.py) with a trace, the hypothesis tests with anything.

Inputs
    tasks      TaskDemand: name, backbone, rate (requests/s), cost_s (device-seconds one request
               takes on a speed-1 device, batching included), latency_s (its own service time on
               an idle speed-1 device; default cost_s), chunk_s (the longest it holds a device
               without yielding: a batch, or one decoder iteration; default cost_s), memory (bytes
               a replica needs on a host: its extension slot and its task process), slo_s (p99
               latency objective), replicas (distinct hosts wanted).
    hosts      HostSpec: name, devices, speed, memory (bytes offered to fmplex), held (backbones it
               holds now: name -> bytes, already counted in its memory), can_load (whether a
               backbone it does not hold may be loaded there), background (utilization not caused
               by the tasks placed here). A host missing from `hosts` is lost.
    current    task -> hosts where it runs now (oldest replica first).
    backbones  backbone -> bytes of one copy (to load a copy where can_load allows).

Model. A replica of task t on host h serves rate_t / replicas_t requests per second, each taking
cost_t / speed_h seconds of one of its devices. The host is one queue of capacity devices x speed:
    utilization  rho_h = background_h + sum_t (rate_t / replicas_t) x cost_t / (devices_h x speed_h)
    wait (p99)   W_h = chunk_max / (1 - rho_h) for rho_h > 0.01, else 0: the longest stretch
                 any of its work holds the device without yielding (chunk_max: a batch, or one
                 decoder iteration), stretched as the load grows like an M/M/1 queue's (a batching
                 server takes every waiting request into its next step, so waits grow with the
                 step, not with the number queued, until the device saturates)
    p99 latency  of task t: latency_t / speed_h + W_h
    backlog      n_h = (rho_h - background_h) / (1 - rho_h): the mean number of its requests waiting
                 or in service (Little's law: rate x mean M/M/1 sojourn).
A host with several devices is approximated by one queue of their summed speed.
Constraints, on every host: the memory of the backbones it holds or loads plus its replicas' memory
fits its memory; rho_h <= max_utilization; every task's p99 latency <= its slo_s; a task's
replicas are on distinct hosts, and only on hosts that hold (or load) its backbone. Both limits
grow monotonically with what shares a host, so a set of replicas that fits fits in any order.
(bench/cluster_sim.py checks the model against simulated latencies.)

Objective, lexicographic: (1) the most tasks with at least one replica, (2) the most replicas,
(3) the least cost = sum_h backlog_h + move_cost x (replicas of already-running tasks that start on
another host). A running replica therefore keeps its host unless it must leave (its host is lost,
or no longer fits it and another host takes it) or a relocation lowers the backlog by more than
move_cost. A running replica that no longer fits anywhere stays where it is, over the limits,
rather than stop (its host is listed in `overloaded`; the autoscaler's job is to add replicas);
so does one whose move would take the last room a task with nowhere else to go needs (by (1)).
Only running replicas stay over the limits: no replica starts on a host the plan leaves over one.

Algorithm (greedy, after MuxServe's placement: units in decreasing popularity x cost, over
candidate splits of the fleet). A candidate split is a target utilization u per backbone copy: it
spreads backbone b's load over k_b = ceil(demand_b / (u x a host's capacity)) copies (demand_b =
sum of rate x cost of its tasks). For each split:
  1. keep the running replicas that still fit (on a host where they do not all fit any more,
     the most demanding first);
  2. place each missing replica, tasks by decreasing demand_b then demand (popularity x cost),
     among the hosts holding its backbone that fit it (sharing-aware: a held copy costs no
     memory), on the one whose longest hold of the device it lengthens least (slow work joins
     slow work, so quick tasks with tight SLOs keep hosts where they fit), then the lowest
     utilization after it; while b has fewer than k_b copies, hosts that could load a new copy
     compete too (ties go to holders, then to the host with fewer tasks); if no holder fits, a
     new copy goes where it would be chosen among those; else the replica stays unplaced.
     Replicas that step 3 would keep where they run go last (a second round), after those that
     have nowhere else to go;
  3. a task still short of replicas keeps its running replicas that did not fit (overloaded);
     replicas step 2 started on a host this puts over a limit leave it and step 2 places them
     again (repeated while step 3 keeps more);
  4. relocate a kept replica when that lowers the backlog by more than move_cost (bounded
     passes), then place what the room they left lets step 2 place.
The split with the best objective wins; ties go to the first (lowest u). Deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

LN100 = math.log(100.0)


@dataclass(frozen=True, slots=True)
class TaskDemand:
    name: str
    backbone: str
    rate: float = 0.0            # requests per second, all replicas together
    cost_s: float = 0.01         # device-seconds per request on a speed-1 device
    memory: int = 0              # bytes one replica needs on its host
    slo_s: float = 10.0          # p99 latency objective
    replicas: int = 1            # distinct hosts wanted
    latency_s: float = 0.0       # own service time on an idle speed-1 device (0: cost_s)
    chunk_s: float = 0.0         # longest hold of a device without yielding (0: cost_s)

    @property
    def own_s(self) -> float:
        return self.latency_s or self.cost_s

    @property
    def hold_s(self) -> float:
        return self.chunk_s or self.cost_s

    @property
    def demand(self) -> float:
        """Device-seconds per second: popularity x cost."""
        return self.rate * self.cost_s


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    memory: int                                  # bytes offered to fmplex on this host
    devices: int = 1
    speed: float = 1.0                           # relative to the device cost_s is measured on
    held: Mapping[str, int] = field(default_factory=dict)   # backbones loaded now -> bytes
    can_load: bool = False                       # may a backbone it does not hold be loaded?
    background: float = 0.0                      # utilization that no placed task explains

    @property
    def capacity(self) -> float:
        return self.devices * self.speed


@dataclass(frozen=True, slots=True)
class Params:
    max_utilization: float = 0.85
    move_cost: float = 0.5                       # in backlog units (requests in the system)
    splits: tuple[float, ...] = (0.5, 0.7, 0.85)  # candidate target utilizations per copy
    relocation_passes: int = 2


@dataclass(frozen=True, slots=True)
class Move:
    """A replica that starts on `target` and/or leaves `source` (both set: a relocation; the
    executor starts the new one before it stops the old one)."""
    task: str
    source: str | None
    target: str | None


@dataclass(frozen=True, slots=True)
class Plan:
    placement: dict[str, tuple[str, ...]]        # task -> hosts (kept replicas first)
    moves: tuple[Move, ...]
    unplaced: tuple[str, ...]                    # tasks with fewer replicas than wanted
    utilization: dict[str, float]                # host -> predicted rho
    copies: dict[str, frozenset[str]]            # host -> backbones held or loaded
    score: tuple[int, int, float]                # (tasks placed, replicas placed, -cost)
    overloaded: tuple[str, ...] = ()             # hosts kept over a limit (step 3)


class _Host:
    """A host's running totals while a plan is built."""

    __slots__ = ("spec", "backbones", "used", "work", "chunk", "slack", "tasks")

    def __init__(self, spec: HostSpec):
        self.spec = spec
        self.backbones = set(spec.held)
        self.used = sum(spec.held.values())
        self.work = 0.0                 # device-seconds per second of its replicas
        self.chunk = 0.0                # longest hold of the device, at this host's speed
        self.slack = math.inf           # min over its tasks of slo - own latency
        self.tasks: list[str] = []

    def state(self) -> tuple:
        return set(self.backbones), self.used, self.work, self.chunk, self.slack, list(self.tasks)

    def restore(self, state: tuple) -> None:
        backbones, self.used, self.work, self.chunk, self.slack, tasks = state
        self.backbones, self.tasks = set(backbones), list(tasks)

    def rho(self, work: float = 0.0) -> float:
        return self.spec.background + (self.work + work) / self.spec.capacity

    def wait99(self, work: float = 0.0, chunk: float = 0.0) -> float:
        rho = self.rho(work)
        if rho >= 1.0:
            return math.inf
        return max(self.chunk, chunk) / (1 - rho) if rho > 0.01 else 0.0

    def over(self, params: Params) -> bool:
        """Over a limit: memory, utilization or a task's SLO."""
        return self.used > self.spec.memory or self.rho() > params.max_utilization or \
            self.wait99() > self.slack

    def backlog(self) -> float:
        rho = self.rho()
        return math.inf if rho >= 1 else (rho - self.spec.background) / (1 - rho)

    def fits(self, t: TaskDemand, bytes_needed: int, params: Params) -> bool:
        if t.name in self.tasks or self.used + bytes_needed > self.spec.memory:
            return False
        work = t.demand / t.replicas
        if self.rho(work) > params.max_utilization:
            return False
        own = t.slo_s - t.own_s / self.spec.speed
        return self.wait99(work, t.hold_s / self.spec.speed) <= min(self.slack, own)

    def add(self, t: TaskDemand, bytes_needed: int, backbone_added: bool) -> None:
        if backbone_added:
            self.backbones.add(t.backbone)
        self.used += bytes_needed
        self.work += t.demand / t.replicas
        self.chunk = max(self.chunk, t.hold_s / self.spec.speed)
        self.slack = min(self.slack, t.slo_s - t.own_s / self.spec.speed)
        self.tasks.append(t.name)

    def remove(self, t: TaskDemand, bytes_freed: int, all_tasks: Mapping[str, TaskDemand]) -> None:
        self.tasks.remove(t.name)
        self.used -= bytes_freed
        self.work -= t.demand / t.replicas
        left = [all_tasks[n] for n in self.tasks]
        self.chunk = max((x.hold_s / self.spec.speed for x in left), default=0.0)
        self.slack = min((x.slo_s - x.own_s / self.spec.speed for x in left), default=math.inf)


def place(tasks: Sequence[TaskDemand], hosts: Sequence[HostSpec],
          current: Mapping[str, Sequence[str]] | None = None,
          backbones: Mapping[str, int] | None = None, params: Params = Params()) -> Plan:
    """The new placement and the moves from `current` to it (see the module's docstring)."""
    current = current or {}
    sizes = dict(backbones or {})
    for h in hosts:
        for b, n in h.held.items():
            sizes.setdefault(b, n)
    best = None
    for u in params.splits:
        plan = _Greedy(tasks, hosts, current, sizes, params).run(u)
        if best is None or plan.score > best.score:
            best = plan
    return best


class _Greedy:
    def __init__(self, tasks, hosts, current, sizes, params: Params):
        self.tasks = {t.name: t for t in tasks}
        self.order = sorted(tasks, key=lambda t: (-t.demand, t.name))
        self.hosts = {h.name: _Host(h) for h in sorted(hosts, key=lambda h: h.name)}
        self.current = current
        self.sizes = sizes
        self.params = params
        self.placement: dict[str, list[str]] = {t.name: [] for t in tasks}
        self.demand: dict[str, float] = {}
        for t in tasks:
            self.demand[t.backbone] = self.demand.get(t.backbone, 0.0) + t.demand

    def run(self, target_u: float) -> Plan:
        kept = set(self._keep())
        spread = self._spread(target_u)
        self._place_missing(spread)
        overloaded = self._keep_overloaded()
        for _ in range(sum(map(len, self.current.values())) + 1):   # each round keeps more
            if not self._evict_started(overloaded):
                break
            self._place_missing(spread)
            overloaded |= self._keep_overloaded()
        if self._relocate(kept):
            self._place_missing(spread)            # relocations may have made room
        return self._plan({n for n in overloaded if self.hosts[n].over(self.params)})

    def _place_missing(self, spread: dict[str, int]) -> None:
        """Step 2. Two rounds: first the replicas that nothing else would place, then those that
        step 3 would keep where they run anyway (over the limits). So a displaced running replica
        never takes the last room from a task that has nowhere else to go (objective (1))."""
        order = sorted(self.order, key=lambda t: (-self.demand[t.backbone], t.backbone))
        for t in order:
            while len(self.placement[t.name]) + self._fallbacks(t) < t.replicas and \
                    self._place_one(t, spread):
                pass
        for t in order:
            while len(self.placement[t.name]) < t.replicas and self._place_one(t, spread):
                pass

    # -- steps ----------------------------------------------------------------------------------

    def _keep(self) -> list[str]:
        """Step 1: keep running replicas (each task's first `replicas` on live hosts). A host
        whose replicas all fit together keeps them all, so a plan is a fixed point of `place`;
        on any other host they are kept in decreasing demand while they fit. Returns the tasks
        that kept a replica."""
        candidates: dict[str, list[TaskDemand]] = {}
        for t in self.order:
            live = [n for n in self.current.get(t.name, ())
                    if n in self.hosts and self._bytes(self.hosts[n], t) is not None]
            for name in live[:t.replicas]:
                candidates.setdefault(name, []).append(t)
        kept = []
        for name, tasks in sorted(candidates.items()):
            h = self.hosts[name]
            before = h.state()
            if all(self._try(h, t) for t in tasks):
                kept += [t.name for t in tasks]
                continue
            h.restore(before)
            for t in tasks:
                if name in self.placement[t.name]:
                    self.placement[t.name].remove(name)
            kept += [t.name for t in tasks if self._try(h, t)]
        for t in self.order:                       # kept replicas stay in their running order
            self.placement[t.name].sort(key=list(self.current.get(t.name, ())).index)
        return kept

    def _try(self, h: _Host, t: TaskDemand) -> bool:
        need = self._bytes(h, t)
        if need is None or not h.fits(t, need, self.params):
            return False
        self._assign(h, t, need)
        return True

    def _keep_overloaded(self) -> set[str]:
        """Step 3: running replicas of tasks still short of replicas stay, over the limits."""
        hosts = set()
        for t in self.order:
            for name in self.current.get(t.name, ()):
                h = self.hosts.get(name)
                if h is None or len(self.placement[t.name]) >= t.replicas or t.name in h.tasks:
                    continue
                need = self._bytes(h, t)
                if need is not None:
                    self._assign(h, t, need)
                    hosts.add(name)
        return hosts

    def _fallbacks(self, t: TaskDemand) -> int:
        """How many replicas of t step 3 would keep where they run (live hosts that can serve it
        and do not serve it in the plan yet)."""
        n = 0
        for name in self.current.get(t.name, ()):
            h = self.hosts.get(name)
            if h is not None and t.name not in h.tasks and self._bytes(h, t) is not None:
                n += 1
        return n

    def _evict_started(self, overloaded: set[str]) -> bool:
        """Step 3 may put a host over a limit after step 2 started replicas there: those leave it
        again (only running replicas may stay over the limits); step 2 then places them anew,
        elsewhere or, once the host is within its limits again, there. True if any left."""
        evicted = False
        for name in sorted(overloaded):
            h = self.hosts[name]
            if not h.over(self.params):
                continue
            for tname in list(h.tasks):
                if name not in self.current.get(tname, ()):
                    self._unassign(h, self.tasks[tname])
                    evicted = True
        return evicted

    def _spread(self, target_u: float) -> dict[str, int]:
        """The split: how many copies each backbone's load may spread over (k_b). (Replicas
        need no target: a task's next replica cannot join a host that has one already, so it
        opens a copy by itself when no other holder fits.)"""
        cap = max((h.spec.capacity for h in self.hosts.values()), default=1.0)
        return {b: max(math.ceil(d / (target_u * cap)), 1) for b, d in self.demand.items()}

    def _copy_candidates(self, b: str) -> list[_Host]:
        """Hosts that could load a copy of b, least utilized (then most free memory) first."""
        size = self.sizes.get(b)
        if size is None:
            return []
        return sorted((h for h in self.hosts.values() if b not in h.backbones and h.spec.can_load
                       and h.used + size <= h.spec.memory),
                      key=lambda h: (h.rho(), h.used - h.spec.memory, h.spec.name))

    def _place_one(self, t: TaskDemand, spread: dict[str, int]) -> bool:
        """Place one more replica of t (step 2); False if no host can take it."""
        work = t.demand / t.replicas

        def option(h: _Host, new_copy: int, need: int) -> tuple:
            longer = max(0.0, t.hold_s / h.spec.speed - h.chunk) if h.tasks else 0.0
            return longer, h.rho(work), new_copy, len(h.tasks), h.spec.name, h, need

        options = [option(h, 0, t.memory) for h in self.hosts.values()
                   if t.backbone in h.backbones and h.fits(t, t.memory, self.params)]
        copies = sum(1 for h in self.hosts.values() if t.backbone in h.backbones)
        if not options or copies < spread[t.backbone]:
            size = self.sizes.get(t.backbone, 0)
            options += [option(h, 1, size + t.memory) for h in self._copy_candidates(t.backbone)
                        if h.fits(t, size + t.memory, self.params)]
        if not options:
            return False
        *_, h, need = min(options, key=lambda o: o[:5])
        self._assign(h, t, need)
        return True

    def _relocate(self, kept: set[str]) -> bool:
        """Step 4: relocate kept replicas while the backlog falls by more than move_cost.
        True if any moved."""
        if self.params.move_cost == math.inf or not kept:
            return False
        moved = False
        for _ in range(self.params.relocation_passes):
            changed = False
            for src in sorted(self.hosts.values(), key=lambda h: (-h.rho(), h.spec.name)):
                for name in [n for n in src.tasks if n in kept]:
                    changed |= self._try_relocate(self.tasks[name], src)
            moved |= changed
            if not changed:
                break
        return moved

    def _try_relocate(self, t: TaskDemand, src: _Host) -> bool:
        before = src.backlog()
        best, best_gain = None, self.params.move_cost
        src.remove(t, t.memory, self.tasks)
        for dst in self.hosts.values():
            if dst is src or t.backbone not in dst.backbones or \
                    not dst.fits(t, t.memory, self.params):
                continue
            old = dst.backlog()
            dst.add(t, t.memory, False)
            gain = before + old - src.backlog() - dst.backlog()
            dst.remove(t, t.memory, self.tasks)
            if gain > best_gain:
                best, best_gain = dst, gain
        if best is None:
            src.add(t, t.memory, False)
            return False
        best.add(t, t.memory, False)
        hosts = self.placement[t.name]
        hosts[hosts.index(src.spec.name)] = best.spec.name
        self._unload_unused(src, t.backbone)       # a copy loaded for nothing more: unloaded
        return True

    # -- helpers --------------------------------------------------------------------------------

    def _bytes(self, h: _Host, t: TaskDemand) -> int | None:
        """Bytes a replica of t needs on h (plus its backbone when h would load a copy)."""
        if t.backbone in h.backbones:
            return t.memory
        if h.spec.can_load and t.backbone in self.sizes:
            return self.sizes[t.backbone] + t.memory
        return None

    def _assign(self, h: _Host, t: TaskDemand, need: int) -> None:
        h.add(t, need, t.backbone not in h.backbones)
        self.placement[t.name].append(h.spec.name)

    def _unassign(self, h: _Host, t: TaskDemand) -> None:
        h.remove(t, t.memory, self.tasks)
        self.placement[t.name].remove(h.spec.name)
        self._unload_unused(h, t.backbone)

    def _unload_unused(self, h: _Host, backbone: str) -> None:
        """A copy h loaded in this plan that none of its tasks uses any more is unloaded."""
        if backbone in h.backbones and backbone not in h.spec.held and \
                all(self.tasks[n].backbone != backbone for n in h.tasks):
            h.backbones.discard(backbone)
            h.used -= self.sizes.get(backbone, 0)

    def _plan(self, overloaded: set[str]) -> Plan:
        placement = {n: tuple(hs) for n, hs in self.placement.items() if hs}
        moves = _moves(self.current, placement, set(self.hosts))
        started = sum(1 for m in moves if m.target is not None and self.current.get(m.task))
        cost = sum(h.backlog() for h in self.hosts.values())
        cost += self.params.move_cost * started if started else 0.0
        unplaced = tuple(sorted(t.name for t in self.order
                                if len(self.placement[t.name]) < t.replicas))
        score = (len(placement), sum(len(v) for v in placement.values()), -cost)
        return Plan(placement=placement, moves=moves, unplaced=unplaced,
                    utilization={n: h.rho() for n, h in self.hosts.items()},
                    copies={n: frozenset(h.spec.held) | {self.tasks[t].backbone for t in h.tasks}
                            for n, h in self.hosts.items()},
                    score=score, overloaded=tuple(sorted(overloaded)))


def _moves(current: Mapping[str, Sequence[str]], new: Mapping[str, tuple[str, ...]],
           alive: set[str]) -> tuple[Move, ...]:
    """The difference between two placements as moves; a replica that leaves a host and one that
    starts on another, of the same task, pair into a relocation. Replicas on lost hosts need no
    removal (nothing runs there any more)."""
    out = []
    for task in sorted(set(current) | set(new)):
        old = [h for h in current.get(task, ()) if h in alive]
        now = list(new.get(task, ()))
        gone = [h for h in old if h not in now]
        came = [h for h in now if h not in current.get(task, ())]
        for i in range(max(len(gone), len(came))):
            out.append(Move(task, gone[i] if i < len(gone) else None,
                            came[i] if i < len(came) else None))
    return tuple(out)

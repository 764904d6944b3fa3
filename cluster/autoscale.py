"""Replica autoscaling: how many hosts a task should run on. A pure function of what the hosts
report, the task's limits and a small state; the controller calls it once per reconcile.

    scale(state, obs, policy, now) -> (state, replicas wanted)

A task is hot when, on its replicas, the worst p99 latency exceeds up_p99 x its SLO, or the
utilization one replica causes, rate x cost / replicas, exceeds up_utilization. It is cold when it
has more than min_replicas and, with one replica fewer, each would still stay under
down_utilization while its p99 is under down_p99 x SLO (an idle task, rate 0, is cold whatever
its last latencies were: the daemon's p99 covers the last requests, not the last seconds).
A task hot for `up_after` consecutive observations gains a replica (up to max_replicas); cold for
`down_after` loses one (down to min_replicas). After any change, `cooldown_s` passes before the
next (the new replica must start and take its share first), and the streaks restart.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    up_p99: float = 1.0              # hot above this x SLO
    up_utilization: float = 0.6      # hot above this utilization per replica
    down_p99: float = 0.5            # cold below this x SLO ...
    down_utilization: float = 0.2    # ... and below this utilization per replica with one fewer
    up_after: int = 3                # consecutive observations
    down_after: int = 10
    cooldown_s: float = 15.0


@dataclass(frozen=True, slots=True)
class Observation:
    rate: float                      # requests per second, all replicas
    p99_s: float                     # worst replica's recent p99 (daemon-side)
    replicas: int                    # serving now
    cost_s: float                    # device-seconds per request
    slo_s: float
    min_replicas: int = 1
    max_replicas: int = 1


@dataclass(frozen=True, slots=True)
class ScaleState:
    wanted: int
    hot: int = 0                     # consecutive hot observations
    cold: int = 0
    changed_at: float = float("-inf")


def scale(state: ScaleState, obs: Observation, policy: ScalePolicy,
          now: float) -> tuple[ScaleState, int]:
    """The next state and the replicas wanted (see the module's docstring)."""
    wanted = min(max(state.wanted, obs.min_replicas), obs.max_replicas)
    if wanted != state.wanted:                         # the limits changed: follow them at once
        return ScaleState(wanted, changed_at=now), wanted
    if obs.replicas < wanted:                          # still starting: no verdict yet
        return replace(state, hot=0, cold=0), wanted
    per = obs.rate * obs.cost_s / max(obs.replicas, 1)
    hot = (obs.rate > 0 and obs.p99_s > policy.up_p99 * obs.slo_s) or per > policy.up_utilization
    fewer = obs.rate * obs.cost_s / max(obs.replicas - 1, 1)
    cold = obs.replicas > obs.min_replicas and (obs.rate == 0 or (
        fewer < policy.down_utilization and obs.p99_s < policy.down_p99 * obs.slo_s))
    state = replace(state, hot=state.hot + 1 if hot else 0, cold=state.cold + 1 if cold else 0)
    if now - state.changed_at < policy.cooldown_s:
        return state, wanted
    if state.hot >= policy.up_after and wanted < obs.max_replicas:
        return ScaleState(wanted + 1, changed_at=now), wanted + 1
    if state.cold >= policy.down_after and wanted > obs.min_replicas:
        return ScaleState(wanted - 1, changed_at=now), wanted - 1
    return state, wanted

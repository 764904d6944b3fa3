"""The run's plan (full and --quick), the goals and the constants the other modules share.

A Plan is frozen; bench/serve.py derives the run's from FULL or QUICK with dataclasses.replace for
--tasks, --alphas and --duration. REFS numbers every request and control command this process sends
(the fmplex client and the baselines' ZeroMQ client draw from the same counter)."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

MIB = 1 << 20
SLO_SCALES = list(range(2, 11))
SYSTEMS = ("fmplex", "co-located", "partitioned")
GOAL_P99_VS_COLOCATED = 0.5
GOAL_P99_VS_PARTITIONED = 0.15
GOAL_CAPACITY_RATIO = 15.0
HEADLINE_ALPHA = 0.9
OVERLOADED_FAILED = 0.2        # a run with more failed requests ends the sweep of its alpha
VERIFY_LIMIT_S = 900.0         # growing to the capacity: give up (keep the extrapolation) after

REFS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Plan:
    n_tasks: int
    alphas: tuple[float, ...]
    load_fractions: tuple[float, ...]     # of fmplex's measured saturation throughput
    headline_load: float                  # the load fraction the goals are judged at
    duration_s: float                     # arrivals per load point
    drain_s: float                        # extra time for replies after the last arrival
    saturation_requests: int
    b1_lengths: tuple[int, ...]
    b1_reps: int
    warmup_per_task: int
    capacity_points: tuple[int, ...]      # fmplex task counts measured before extrapolating
    verify_capacity: bool                 # start the extrapolated number of tasks
    verify_max_fmplex: int
    verify_max_baseline: int
    profile_batches: int


FULL = Plan(n_tasks=16, alphas=(0.5, 0.9, 1.3), load_fractions=(0.2, 0.4, 0.6, 0.8),
            headline_load=0.6, duration_s=20.0, drain_s=20.0, saturation_requests=400,
            b1_lengths=(4, 8, 12, 16, 24, 32, 48, 64, 96, 128), b1_reps=7, warmup_per_task=3,
            capacity_points=(1, 4, 16, 32), verify_capacity=True, verify_max_fmplex=1200,
            verify_max_baseline=64, profile_batches=40)
QUICK = Plan(n_tasks=4, alphas=(0.9,), load_fractions=(0.3, 0.6), headline_load=0.6,
             duration_s=4.0, drain_s=10.0, saturation_requests=60, b1_lengths=(4, 32, 128),
             b1_reps=3, warmup_per_task=1, capacity_points=(1, 4), verify_capacity=False,
             verify_max_fmplex=0, verify_max_baseline=0, profile_batches=6)


def workload(plan: Plan) -> dict:
    """serve.json's "workload": the sweep's workload in a sentence, and bench/workload.py's
    WorkloadSpec defaults (the lengths and popularity the sentence states)."""
    from bench.workload import WorkloadSpec
    return {"description": (
        f"{plan.n_tasks} tasks, rate_i ~ (i+1)^-alpha with alpha in "
        f"{{{', '.join(f'{a:g}' for a in plan.alphas)}}}, Poisson arrivals, input lengths "
        f"lognormal(median 20, sigma 0.6) tokens clipped to [4, 128] (random common words, "
        f"exactly that many tokens), seed = 100 x alpha"),
        "spec_defaults": dataclasses.asdict(WorkloadSpec())}

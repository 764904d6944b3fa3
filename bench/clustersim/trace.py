"""The simulated tasks and their requests: a trace, deterministic per seed.

Tasks: task i (0 = the most popular) gets rate min_rate + top_rate x (i + 1)^-0.9 (zipf, as the
serving benchmark's workload; every task keeps some traffic), a backbone drawn by the fleet's mix,
and an SLO of 5x, 10x or 20x its backbone's batch-1 time on a dedicated device (drawn evenly).
Requests: a Poisson process per task over [0, duration); each request's size in tokens is its
backbone's (images, series and prompts a fixed count; text lognormal, median 20, sigma 0.6,
clipped to 4..128: bench/workload.py's lengths).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.clustersim.fleet import Backbone, Fleet

ALPHA = 0.9
SLO_FACTORS = (5.0, 10.0, 20.0)


@dataclass(frozen=True, slots=True)
class SimTask:
    name: str
    backbone: Backbone
    rate: float
    slo_s: float


def make_tasks(fleet: Fleet, n: int, min_rate: float, seed: int) -> list[SimTask]:
    rng = np.random.default_rng(seed)
    names = [b for b, _ in fleet.mix]
    shares = np.array([s for _, s in fleet.mix])
    picks = rng.choice(len(names), size=n, p=shares / shares.sum())
    factors = rng.choice(SLO_FACTORS, size=n)
    out = []
    for i in range(n):
        b = fleet.backbones()[picks[i]]
        out.append(SimTask(f"t{i:05d}", b, min_rate + fleet.top_rate * (i + 1) ** -ALPHA,
                           float(factors[i]) * b.batch1_s(fleet.gpu)))
    return out


def arrivals(tasks: list[SimTask], duration_s: float, seed: int) -> dict[str, tuple]:
    """task -> (arrival times, tokens), both sorted by time."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for t in tasks:
        k = rng.poisson(t.rate * duration_s)
        times = np.sort(rng.uniform(0.0, duration_s, size=k))
        if t.backbone.lognormal:
            lengths = rng.lognormal(np.log(t.backbone.tokens), 0.6, size=k)
            tokens = np.clip(np.round(lengths), 4, 128)
        else:
            tokens = np.full(k, t.backbone.tokens)
        out[t.name] = (times, tokens.astype(np.int64))
    return out

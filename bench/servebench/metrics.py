"""What the runs measure, computed from their records: latency percentiles, SLO attainment against
the batch-1 reference, throughput, per-task figures; memory (PSS by role) and the processes left
behind; line fits for the memory model (fixed + per task) and the SLO reference.

A failed request counts as infinitely late: it lowers SLO attainment and, past 1% of the
requests, makes p99 None. Every pid pss_total sees is remembered (SEEN); leftovers() says which of
them still run at the end."""
from __future__ import annotations

import time

import numpy as np

from bench.servebench.driver import Record
from bench.servebench.plan import MIB, SLO_SCALES, SYSTEMS


def b1_reference(table: dict[int, float]):
    xs = np.array(sorted(table))
    ys = np.array([table[x] for x in xs])
    return lambda tokens: np.interp(tokens, xs, ys)


def percentiles(lat: np.ndarray) -> dict:
    """p50/p90/p99 in ms; failed requests count as infinitely late (a percentile among them is
    None). Linear interpolation when every request completed, else the next-higher sample."""
    if len(lat) == 0:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    method = "linear" if np.isfinite(lat).all() else "higher"
    p = np.percentile(lat, [50, 90, 99], method=method) * 1e3
    return {k: (None if not np.isfinite(v) else round(float(v), 2))
            for k, v in zip(("p50_ms", "p90_ms", "p99_ms"), p)}


def summarize(records: list[Record], b1, duration_s: float, n_tasks: int) -> dict:
    lat = np.array([r.latency_s for r in records])          # failures are +inf: they count
    ok = np.array([r.ok for r in records])
    ref = b1(np.array([r.tokens for r in records]))
    window = max(duration_s, max((r.done_at for r in records), default=0.0))
    out = {"requests": len(records), "completed": int(ok.sum()), "failed": int((~ok).sum()),
           "throughput_rps": round(float(ok.sum()) / window, 2), **percentiles(lat),
           "slo_attainment": {str(s): round(float(np.mean(lat <= s * ref)), 4) for s in SLO_SCALES}
           if len(lat) else {}}
    errors = sorted({r.error for r in records if not r.ok})
    if errors:
        out["errors"] = errors[:5]
    per_task = []
    for i in range(n_tasks):
        sel = [r for r in records if r.task == i]
        tl = np.array([r.latency_s for r in sel])
        tref = b1(np.array([r.tokens for r in sel])) if sel else np.array([])
        per_task.append({"task": i, "requests": len(sel),
                         "throughput_rps": round(sum(r.ok for r in sel) / window, 3),
                         **percentiles(tl),
                         "slo_attainment_5x": round(float(np.mean(tl <= 5 * tref)), 4) if sel else None})
    out["per_task"] = per_task
    return out


SEEN: set = set()       # (pid, start time) of every process measured: checked gone at the end


def _identity(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return pid, int(f.read().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def leftovers(wait_s: float = 15.0) -> list[int]:
    """Processes this run measured that still run (the same pid and start time), after giving
    stopping ones up to wait_s to exit."""
    deadline = time.monotonic() + wait_s
    while True:
        left = sorted(pid for pid, start in SEEN if _identity(pid) == (pid, start))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def pss_total(pids: dict[str, list[int]]) -> dict:
    from testkit.launch import pss_bytes
    out, total = {}, 0
    SEEN.update(filter(None, (_identity(p) for ps in pids.values() for p in ps)))
    for role, ps in pids.items():
        sizes = []
        for pid in ps:
            try:
                sizes.append(pss_bytes(pid))
            except (FileNotFoundError, ProcessLookupError):
                pass
        out[role] = {"processes": len(sizes), "pss_mib": round(sum(sizes) / MIB, 1),
                     "mean_pss_mib": round(sum(sizes) / max(1, len(sizes)) / MIB, 1)}
        total += sum(sizes)
    out["total_mib"] = round(total / MIB, 1)
    return out


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares fixed + per-task cost (MiB) from (tasks, total MiB) points."""
    x = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    if len(set(x)) < 2:
        return 0.0, float(y[0] / x[0])
    slope, intercept = np.polyfit(x, y, 1)
    return float(max(0.0, intercept)), float(slope)


def theil_sen(x: list[float], y: list[float]):
    """A line through (x, y) robust to outliers (a neighbour's burst during one measurement):
    slope = median of the pairwise slopes, intercept = median of y - slope * x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(len(x), 1)
    keep = x[j] != x[i]
    slope = float(np.median((y[j] - y[i])[keep] / (x[j] - x[i])[keep])) if keep.any() else 0.0
    slope = max(0.0, slope)
    intercept = float(np.median(y - slope * x))
    return lambda n: intercept + slope * n


def outputs_agree(probes: dict[str, list]) -> bool:
    """Whether every system gave fmplex's top label, with a score within 2e-3, on every probe."""
    return all(a[0] == b[0] and abs(a[1] - b[1]) < 2e-3
               for s in SYSTEMS[1:] for a, b in zip(probes["fmplex"], probes[s]))

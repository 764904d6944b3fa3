"""The measurement phases run on one system: the batch-1 SLO reference of a dedicated instance
(measure_b1) and the alpha x load sweep (serve_runs, with a load point skipped once a lower one
overloaded).

serve_runs returns serve.json's entry of a system: "runs" (one summary per alpha x load point, in
plan order), "probe" (its outputs on fixed inputs, compared across systems by the caller) and
"memory" (PSS by role after the runs)."""
from __future__ import annotations

import time

import numpy as np

from bench.servebench.baselines import Baselines
from bench.servebench.driver import drive, probe_outputs, run_async, settle, warm_up
from bench.servebench.metrics import pss_total, summarize, theil_sen
from bench.servebench.plan import HEADLINE_ALPHA, OVERLOADED_FAILED, SLO_SCALES, Plan
from bench.servebench.tasks import TaskBank
from bench.workload import WorkloadSpec, generate, make_text


def measure_b1(bank: TaskBank, plan: Plan, spec: WorkloadSpec, device: str) -> dict:
    """Batch-1 latency of a dedicated instance (co-located placement, alone on the machine, one
    request at a time, client-measured), by input length in tokens: the minimum of the reps (the
    uncontended service time), then a robust line through those minima (theil_sen), so that one
    disturbed length cannot skew the SLO reference."""
    system = Baselines("dedicated", device)
    system.start([bank[0]])
    try:
        async def run():
            await system.open(60)
            rng = np.random.default_rng(5)
            table, medians = {}, {}
            try:
                await warm_up(system, 1, 3, spec)
                for n in plan.b1_lengths:
                    ts = []
                    for _ in range(plan.b1_reps):
                        text = make_text(rng, n)
                        t = time.perf_counter()
                        await system.infer(0, text, 60)
                        ts.append(time.perf_counter() - t)
                    table[n], medians[n] = float(np.min(ts)), float(np.median(ts))
            finally:
                await system.close()
            return table, medians
        table, medians = run_async(run())
        mem = pss_total(system.pids())
    finally:
        system.stop()
    fit = theil_sen(list(table), list(table.values()))
    table = {n: max(fit(n), min(table.values())) for n in sorted(table)}
    return {"by_tokens_ms": {str(k): round(v * 1e3, 2) for k, v in table.items()},
            "median_by_tokens_ms": {str(k): round(v * 1e3, 2) for k, v in medians.items()},
            "pss_mib": mem["total_mib"], "table_s": table}


def serve_runs(system, plan: Plan, loads: list[float], b1, log) -> dict:
    """Warm-up, outputs probe, then every alpha x load point on an already started system."""
    timeout_s = plan.duration_s + plan.drain_s
    results: dict = {"runs": []}

    async def run():
        await system.open(timeout_s)
        try:
            base = WorkloadSpec(n_tasks=plan.n_tasks, alpha=HEADLINE_ALPHA, total_rate=1.0,
                                duration_s=1.0)
            await warm_up(system, plan.n_tasks, plan.warmup_per_task, base)
            results["probe"] = await probe_outputs(system, plan.n_tasks, base)
            for alpha in plan.alphas:
                overloaded_at = None
                for frac, rate in zip(plan.load_fractions, loads):
                    if overloaded_at is not None:           # higher loads: overloaded as well
                        results["runs"].append(skipped_run(alpha, frac, rate, overloaded_at))
                        continue
                    spec = WorkloadSpec(n_tasks=plan.n_tasks, alpha=alpha, total_rate=rate,
                                        duration_s=plan.duration_s, seed=int(alpha * 100))
                    events = generate(spec)
                    t = time.perf_counter()
                    records, lag = await drive(system, events, timeout_s)
                    s = summarize(records, b1, plan.duration_s, plan.n_tasks)
                    s.update(alpha=alpha, load_fraction=frac, offered_rps=round(rate, 2),
                             driver_lag_p99_ms=round(lag * 1e3, 2),
                             wall_s=round(time.perf_counter() - t, 1),
                             settle_s=round(await settle(system, plan.n_tasks), 1))
                    results["runs"].append(s)
                    log(f"  {system.name:11s} alpha {alpha:g} load {frac:.0%} ({rate:.1f} req/s): "
                        f"{s['throughput_rps']:.1f} req/s, p50 {s['p50_ms']} p99 {s['p99_ms']} ms, "
                        f"SLO@5x {s['slo_attainment'].get('5', 0):.0%}, failed {s['failed']}"
                        + (f" (e.g. {s['errors'][0]})" if s.get("errors") else ""))
                    if s["failed"] > OVERLOADED_FAILED * s["requests"]:
                        overloaded_at = frac
        finally:
            await system.close()

    run_async(run())
    results["memory"] = pss_total(system.pids())
    return results


def skipped_run(alpha: float, frac: float, rate: float, overloaded_at: float) -> dict:
    """A load point not run because a lower one already failed most requests: it is reported
    with every request failed (p50/p90/p99 None, SLO attainment 0), and marked."""
    return {"alpha": alpha, "load_fraction": frac, "offered_rps": round(rate, 2), "skipped":
            f"overloaded at {overloaded_at:.0%} (more than {OVERLOADED_FAILED:.0%} of requests "
            f"failed): not run", "requests": 0, "completed": 0, "failed": 0,
            "throughput_rps": None, "p50_ms": None, "p90_ms": None, "p99_ms": None,
            "slo_attainment": {str(s): 0.0 for s in SLO_SCALES}, "per_task": [],
            "driver_lag_p99_ms": 0.0}

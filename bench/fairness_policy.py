"""The noisy-neighbour goal against the scheduling policy alone: fmplexd.scheduler on a virtual
clock, no processes, no sockets, no CPU contention.

    python -m bench.fairness_policy [--quick] [--out DIR] [--tokens-per-s R] [--overhead-ms O]

bench/fairness.py measures the whole system; this isolates the scheduling policy (non-preemptive
batches of a token budget). Same shape as bench/fairness.py: 4 tasks of weight 1; q0..q2 offered
Poisson arrivals at LOAD x capacity / 4 each (lengths from bench/workload.py); phase A without,
phase B with a flooder that keeps its queue (256) full. A batch of T tokens takes
T / tokens_per_s + overhead (defaults: what fmplexd measured for all-MiniLM-L6-v2 on 1 CPU thread
here). The batch budget is swept (batch_target_ms x tokens_per_s is the daemon's choice), and so
is LOAD. A quiet request's latency = its batch's end - its arrival.

Three policies side by side, each on the same arrivals:
  SFQ              fmplexd's default: the strict lift rule (an idle task banks no credit)
  K = CREDIT       fmplexd.scheduler with idle_credit = CREDIT tokens (bounded banked credit)
  strict priority  quiet requests first (FIFO), the flooder fills the rest: a quiet request
                   never waits behind a queued flood request, only behind the running batch
                   (a reference, not a bound: FIFO among the quiet tasks can lose to SFQ)
What it shows: the p99 ratio B / A each policy allows, before any implementation cost. Above the
goal (1.3x) for every budget, no implementation of that policy meets it at that load and speed.
"""
from __future__ import annotations

import functools
import sys
from collections import deque

from bench import common

import numpy as np

from bench import workload
from fmplexd.scheduler import Request, Scheduler

GOAL = 1.3
QUIET = ("q0", "q1", "q2")
FLOOD_QUEUE = 256
BUDGETS_MS = (20, 35, 50, 80, 120)     # batch targets swept (50 = the daemon's default)
LOADS = (0.3, 0.6)                     # 0.6 = bench/fairness.py's LOAD
CREDIT = 512.0                         # idle_credit (tokens) of the second policy compared


@functools.lru_cache(maxsize=None)
def mean_tokens(seed: int) -> float:
    """Mean request length of the workload generator (one estimate per seed, not per run)."""
    spec = workload.WorkloadSpec(seed=seed)
    return float(np.mean(workload.lengths(np.random.default_rng(seed), spec, 100_000)))


def quiet_arrivals(load: float, tokens_per_s: float, duration_s: float,
                   seed: int) -> list[tuple[float, str, int]]:
    """(time, task, tokens) of q0..q2's Poisson arrivals, LOAD x capacity / 4 each, by time."""
    spec = workload.WorkloadSpec(seed=seed)
    rate = load * tokens_per_s / mean_tokens(seed) / 4      # capacity: requests/s, large batches
    arrivals = []
    for i, task in enumerate(QUIET):
        rng = np.random.default_rng([seed, i])
        times = workload.arrival_times(rng, rate, duration_s)
        for t, n in zip(times, workload.lengths(rng, spec, len(times))):
            arrivals.append((float(t), task, int(n)))
    return sorted(arrivals)


def simulate(load: float, budget: int, flood: bool, tokens_per_s: float, overhead_s: float,
             duration_s: float, seed: int = 0, credit: float = 0.0) -> np.ndarray:
    """Latencies (s) of the quiet tasks' requests over one phase under fmplexd.scheduler with
    idle_credit = credit (0: the strict lift rule)."""
    arrivals = quiet_arrivals(load, tokens_per_s, duration_s, seed)
    s = Scheduler(token_budget=budget, max_requests=256, idle_credit=credit)
    for task in QUIET + ("flood",):
        s.add_task(task, 1.0, 1 << 20)
    flood_cost = int(round(mean_tokens(seed)))
    now, i, lat = 0.0, 0, []
    while i < len(arrivals) or any(s.task_stats(t)["queued"] for t in QUIET):
        while i < len(arrivals) and arrivals[i][0] <= now:
            t, task, n = arrivals[i]
            s.submit(Request(task, n, t + 3600.0, None, t))
            i += 1
        if flood and now < duration_s:
            for _ in range(FLOOD_QUEUE - s.task_stats("flood")["queued"]):
                s.submit(Request("flood", flood_cost, now + 3600.0, None, now))
        batch = s.form_batch(now)
        if not batch.requests:                   # idle until the next arrival
            now = arrivals[i][0]
            continue
        now += batch.tokens / tokens_per_s + overhead_s
        lat += [now - r.arrival for r in batch.requests if r.task != "flood"]
    return np.array(lat)


def simulate_priority(load: float, budget: int, flood: bool, tokens_per_s: float,
                      overhead_s: float, duration_s: float, seed: int = 0) -> np.ndarray:
    """The same phase under strict priority: quiet requests first (FIFO), the flooder fills what
    is left of the budget. A quiet request waits behind no queued flood request; what it still
    loses in phase B is the wait for the flooder's running batch."""
    arrivals = quiet_arrivals(load, tokens_per_s, duration_s, seed)
    flood_cost = int(round(mean_tokens(seed)))
    now, i, queue, lat = 0.0, 0, deque(), []
    while i < len(arrivals) or queue:
        while i < len(arrivals) and arrivals[i][0] <= now:
            queue.append(arrivals[i])
            i += 1
        flooding = flood and now < duration_s
        if not queue and not flooding:
            now = arrivals[i][0]
            continue
        tokens, taken = 0, []
        while queue and (not taken or tokens + queue[0][2] <= budget):
            taken.append(queue.popleft())
            tokens += taken[-1][2]
        while flooding and (tokens == 0 or tokens + flood_cost <= budget):
            tokens += flood_cost
        now += tokens / tokens_per_s + overhead_s
        lat += [now - t for t, _, _ in taken]
    return np.array(lat)


def p99_ratio(run) -> dict:
    """Phases A and B of one policy, run(flood=...) giving latencies in s: p50/p99 in ms, ratio."""
    a, b = (run(flood=flood) * 1e3 for flood in (False, True))
    pa50, pa99 = (float(x) for x in np.percentile(a, [50, 99]))
    pb99 = float(np.percentile(b, 99))
    return {"A_p50_ms": pa50, "A_p99_ms": pa99, "B_p99_ms": pb99, "p99_ratio": pb99 / pa99}


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--tokens-per-s", type=float, default=1160.0,
                    help="forward throughput (default: fmplexd's measurement, 1 CPU thread)")
    ap.add_argument("--overhead-ms", type=float, default=5.0, help="fixed cost per batch")
    args = ap.parse_args()
    out = common.out_dir(args.out, "fairness_policy")
    duration = 60.0 if args.quick else 600.0
    tps, ovh = args.tokens_per_s, args.overhead_ms / 1e3
    rows, results = [], []
    for load in LOADS:
        for ms in BUDGETS_MS:
            budget = max(1, int(tps * ms / 1e3))
            r = {"load": load, "batch_target_ms": ms, "budget_tokens": budget}
            for name, run in (("sfq", simulate),
                              ("credit", functools.partial(simulate, credit=CREDIT)),
                              ("priority", simulate_priority)):
                r[name] = p99_ratio(functools.partial(
                    run, load=load, budget=budget, tokens_per_s=tps, overhead_s=ovh,
                    duration_s=duration))
            results.append(r)
            sfq = r["sfq"]
            rows.append([f"{load:g}", f"{ms} ms ({budget} tokens)",
                         f"{sfq['A_p99_ms']:.1f} / {sfq['B_p99_ms']:.1f}",
                         *(f"{r[k]['p99_ratio']:.2f}x {common.verdict(r[k]['p99_ratio'] <= GOAL)}"
                           for k in ("sfq", "credit", "priority"))])
    best = {f"{load:g}": {k: min(r[k]["p99_ratio"] for r in results if r["load"] == load)
                          for k in ("sfq", "credit", "priority")} for load in LOADS}
    common.write_json(out, "fairness_policy.json", {
        "tokens_per_s": tps, "overhead_ms": args.overhead_ms, "phase_s": duration,
        "goal_p99_ratio": GOAL, "idle_credit": CREDIT, "runs": results,
        "best_ratio_per_load": best, "quick": args.quick})
    print("best p99 ratio B/A per load: " + "; ".join(
        f"{load}: " + ", ".join(f"{k} {v:.2f}x" for k, v in b.items())
        for load, b in best.items()), file=sys.stderr)
    common.print_table(["load", "batch target (budget)", "SFQ: A / B p99 ms", "SFQ p99 B/A",
                        f"K={CREDIT:g} p99 B/A", "strict priority p99 B/A"], rows,
                       title=f"fairness policy alone, virtual clock: {tps:g} tokens/s + "
                             f"{args.overhead_ms:g} ms per batch, {duration:g} s per phase; goal "
                             f"<= {GOAL}x; SFQ = the strict lift rule (default), K = bounded "
                             f"idle credit (tokens), strict priority = quiet requests "
                             f"always first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

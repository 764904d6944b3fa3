"""The cluster-scale claim, simulated: how many tasks each way of hosting keeps within its SLO on
the same fleet, for one instance per task, MuxServe-style placement and fmplex.

    python -m bench.cluster_sim [--quick] [--out DIR] [--fleets gpu,cpu] [--min-rate 0.1]
                                [--duration 60] [--seed 0]

A trace-driven simulation on the real placement function (cluster/placement.py). Fleets: 16 GPUs
of 80 GB (one fmplexd per GPU) and 16 CPU hosts like this machine (2 cores, 24 GiB). Tasks over
backbones of real sizes, from all-MiniLM-L6-v2 to 7B-class LLMs, DINOv2, a time-series model
(bench/clustersim/fleet.py), with zipf popularity (alpha 0.9) above a floor rate per task, SLOs of
5x, 10x or 20x a dedicated batch-1 time, Poisson requests (bench/clustersim/trace.py). Service
times come from this project's measured figures for all-MiniLM-L6-v2 on this CPU (bench/serve.py,
docs/benchmarks.md), scaled by parameter count and depth to the other encoders; GPU figures are
scaled from them by stated assumptions (no GPU here): fleet.py says which is which.

For growing numbers of tasks offered (each with the same trace position whatever the count), each
policy places what it can and the simulation measures every request; a task counts when it was
placed and its p99 met its SLO. Reported: tasks hosted within SLO, best over the sweep, per policy
and fleet, the ratios, and how the ratio moves with the floor rate (--min-rate; the busier every
task, the more the claim rests on compute rather than memory). Table printed last; JSON and
cluster_sim.png under --out.
"""
from __future__ import annotations

import time

from bench import common
from bench.clustersim.engine import simulate, within_slo
from bench.clustersim.fleet import FLEETS
from bench.clustersim.policies import POLICIES
from bench.clustersim.trace import arrivals, make_tasks

SWEEP = {"gpu": (256, 512, 1024, 2048, 4096, 8192, 16384),
         "cpu": (64, 128, 256, 512, 1024, 2048, 4096, 8192)}
QUICK_SWEEP = {"gpu": (256, 1024, 4096), "cpu": (64, 256, 1024)}
SENSITIVITY = (0.02, 0.1, 0.5, 2.0)
GOAL = 6.0


def run_point(fleet, n: int, min_rate: float, duration: float, seed: int) -> dict:
    tasks = make_tasks(fleet, n, min_rate, seed)
    trace = arrivals(tasks, duration, seed)
    point = {"offered": n, "requests": int(sum(len(a[0]) for a in trace.values()))}
    for policy in POLICIES:
        started = time.monotonic()
        dep = policy(fleet, tasks)
        results = simulate(dep, fleet, trace, warmup_s=min(5.0, duration / 10))
        point[dep.policy] = {"placed": len(results), "within_slo": within_slo(results),
                             "unplaced": dep.unplaced,
                             "seconds": round(time.monotonic() - started, 1)}
    return point


def sweep(fleet, sizes, min_rate: float, duration: float, seed: int) -> dict:
    points = [run_point(fleet, n, min_rate, duration, seed) for n in sizes]
    names = [k for k in points[0] if isinstance(points[0][k], dict)]
    best = {p: max(pt[p]["within_slo"] for pt in points) for p in names}
    return {"points": points, "best": best}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--fleets", default="gpu,cpu")
    ap.add_argument("--min-rate", type=float, default=0.1, help="requests/s every task gets")
    ap.add_argument("--duration", type=float, default=60.0, help="simulated seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = common.out_dir(args.out, "cluster_sim")
    sweeps = QUICK_SWEEP if args.quick else SWEEP
    duration = min(args.duration, 20.0) if args.quick else args.duration
    results, sensitivity = {}, {}
    for name in args.fleets.split(","):
        fleet = FLEETS[name]
        results[name] = sweep(fleet, sweeps[name], args.min_rate, duration, args.seed)
        rates = SENSITIVITY[1:3] if args.quick else SENSITIVITY
        sensitivity[name] = {r: sweep(fleet, sweeps[name], r, duration, args.seed)["best"]
                             for r in rates if r != args.min_rate}
        sensitivity[name][args.min_rate] = results[name]["best"]
    plots = plot(out, results)
    report(args, out, results, sensitivity, plots)


def ratio(best: dict, a: str, b: str) -> float:
    return best[a] / best[b] if best[b] else float("inf")


def plot(out: str, results: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        offered = [p["offered"] for p in res["points"]]
        for policy in res["best"]:
            ax.plot(offered, [p[policy]["within_slo"] for p in res["points"]], marker="o",
                    label=policy)
        ax.plot(offered, offered, color="grey", linestyle=":", label="offered")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{name} fleet: {FLEETS[name].devices} devices")
        ax.set_xlabel("tasks offered")
        ax.set_ylabel("tasks hosted within SLO")
        ax.legend()
    fig.tight_layout()
    path = f"{out}/cluster_sim.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def report(args, out: str, results: dict, sensitivity: dict, plots: list[str]) -> None:
    rows, goals, sens_rows = [], [], []
    for name, res in results.items():
        best = res["best"]
        for policy, n in best.items():
            at = next(p for p in res["points"] if p[policy]["within_slo"] == n)
            rows.append([name, policy, n, at["offered"], at[policy]["placed"],
                         f"{ratio(best, policy, 'one instance per task'):.1f}x"])
        r1 = ratio(best, "fmplex", "one instance per task")
        r2 = ratio(best, "fmplex", "MuxServe-style")
        goals.append([f"{name}: fmplex / one instance per task", f"{r1:.1f}x", f">= {GOAL:.0f}x",
                      common.verdict(r1 >= GOAL)])
        goals.append([f"{name}: fmplex / MuxServe-style", f"{r2:.1f}x", "> 1",
                      common.verdict(r2 > 1)])
        for rate, b in sorted(sensitivity[name].items()):
            sens_rows.append([name, rate, b["one instance per task"], b["MuxServe-style"],
                              b["fmplex"], f"{ratio(b, 'fmplex', 'one instance per task'):.1f}x",
                              f"{ratio(b, 'fmplex', 'MuxServe-style'):.1f}x"])
    from bench.clustersim import fleet as sources
    figures = {k: v for k, v in vars(sources).items()
               if k.isupper() and isinstance(v, (int, float))}
    common.write_json(out, "cluster_sim.json", {
        "args": vars(args), "figures": figures, "fleets": results,
        "sensitivity": {f: {str(r): b for r, b in s.items()} for f, s in sensitivity.items()},
        "goals": goals, "plots": plots})
    common.print_table(["fleet", "floor rate req/s", "one instance", "MuxServe-style", "fmplex",
                        "fmplex / one", "fmplex / MuxServe"], sens_rows,
                       title="best within SLO by floor rate per task")
    common.print_table(["goal", "measured", "target", "result"], goals, title="goals")
    common.print_table(["fleet", "policy", "tasks within SLO (best)", "at tasks offered", "placed",
                        "vs one instance"], rows, title="tasks hosted within SLO")


if __name__ == "__main__":
    main()

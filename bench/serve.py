#!/usr/bin/env python3
"""Serving benchmark: fmplex vs one model instance per task (co-located, partitioned).

    python -m bench.serve [--quick] [--out DIR] [--doc docs/benchmarks.md]    (or `fmplex bench serve`)

Three systems serve the same N tasks (all-MiniLM-L6-v2 + per task its own LoRA, of varied ranks and
target modules, and a linear classification head) under the same generated workload
(bench/workload.py: Poisson arrivals, popularity rate_i ~ (i+1)^-alpha, lognormal input lengths):

  fmplex        the real daemon (fmplexd) and one task process per task, deployed through the
                control socket: one shared backbone, batched across tasks, fair-queued.
  co-located    one process per task (bench/baseline.py), each with its own copy of the backbone
                with the task's LoRA merged in and its head; all share every core with torch's
                default thread count and no coordination. Each batches what is already waiting.
  partitioned   the same processes, each confined to a fixed slice of the machine. CPU: pinned
                to its cores (tasks round-robin over the cores when there are more tasks than
                cores), torch threads = cores of its slice, and, where a cgroup-v1 `cpu`
                controller is writable, a CFS quota of (cores / N) CPUs so that the slice is fixed
                (not lent to busy neighbours): the CPU analog of MPS's active-thread percentage.
                GPU (--device cuda, baselines only): MPS active-thread percentage 100/N if an MPS
                control daemon runs, otherwise equal time slices. The JSON says which was used.

The load driver is open loop (requests leave at their scheduled times whatever the replies) in one
asyncio process, with the fmplex AsyncClient for fmplex and an async ZeroMQ client speaking the same
Infer/InferReply messages for the baselines. Latency = reply time - scheduled arrival time.

Phases: (1) batch-1 latency of a dedicated instance (one baseline process alone, one request at a
time, by input length): the SLO reference; (2) fmplex's saturation throughput (closed burst), which
sets the offered-load sweep (fractions of it); (3) for each system: start, check its outputs
against the others, warm up, run every alpha x load point, measure PSS; (4) capacity within the
memory budget: fixed + per-task memory from 1, 4, ... tasks, extrapolated, and verified by
starting that many where feasible (every hosted task must answer a request); (5) a profile of the
daemon's loop (bench/profile_daemon.py). Writes serve.json and three PNG plots to --out and prints
a markdown table last; --doc also regenerates the serving section of docs/benchmarks.md.

    python -m bench.serve --workload mixed [--quick] [--out DIR]

The mixed-family workload instead (bench/servebench/mixed.py): tasks of the text, vision and
time-series families on one daemon vs one process per task, latency per family, memory per task,
and each family's share of the device time against its share of the weights.
"""
from __future__ import annotations

import os
import sys

# The pieces live in bench/servebench/ (one job per module; see its __init__).

import dataclasses
import json
import shlex
import shutil
import time

from bench import common
from bench.servebench import baselines, capacity, tasks as taskdefs
from bench.servebench.baselines import Baselines
from bench.servebench.capacity import (baseline_capacity, fmplex_capacity,
                                       fmplex_memory_point)
from bench.servebench.doc import notes, write_doc
from bench.servebench.driver import run_async, saturation
from bench.servebench.fmplex_system import Fmplex
from bench.servebench.metrics import b1_reference, leftovers, outputs_agree
from bench.servebench.phases import measure_b1, serve_runs
from bench.servebench.plan import FULL, HEADLINE_ALPHA, QUICK, SYSTEMS, workload
from bench.servebench.plots import plot
from bench.servebench.report import capacity_table, goals, tables
from bench.workload import WorkloadSpec


def parse_args():
    ap = common.parser(__doc__)
    ap.add_argument("--doc", default=None, help="regenerate this markdown file's serving section")
    ap.add_argument("--doc-section", default="",
                    help="with --doc: a named section of its own (a variant run), not the main one")
    ap.add_argument("--doc-from", default=None, metavar="SERVE_JSON",
                    help="with --doc: regenerate the section from an earlier run's serve.json "
                         "(runs nothing; the command recorded is the one that made it)")
    ap.add_argument("--tasks", type=int, default=None, help="N (default 16; 4 with --quick)")
    ap.add_argument("--budget-gib", type=float, default=8.0, help="memory budget for capacity")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="device of the baseline instances (fmplexd's executor runs on the CPU)")
    ap.add_argument("--partition", default="auto", choices=("auto", "pin", "quota"),
                    help="CPU partitioning: pinned cores + a CFS quota where possible (auto), "
                         "pinned cores only (pin), or require the quota (quota)")
    ap.add_argument("--daemon-threads", type=int, default=0,
                    help="fmplexd's torch threads per executor lane (0 = its default)")
    ap.add_argument("--daemon-config", default="",
                    help="extra fmplexd.toml lines, e.g. 'executor_lanes = 1' (a variant run)")
    ap.add_argument("--colocated-threads", type=int, default=0,
                    help="torch threads of each co-located instance (0 = torch's default)")
    ap.add_argument("--alphas", default=None, help="comma-separated alphas (default 0.5,0.9,1.3)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per point")
    ap.add_argument("--no-profile", action="store_true", help="skip the daemon loop profile")
    ap.add_argument("--workload", default="text", choices=("text", "mixed"),
                    help="text tasks on MiniLM (default), or tasks of every family "
                         "(bench/servebench/mixed.py)")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    if args.tasks:
        plan = dataclasses.replace(plan, n_tasks=args.tasks)
    if args.alphas:
        plan = dataclasses.replace(plan, alphas=tuple(float(a) for a in args.alphas.split(",")))
    if args.duration:
        plan = dataclasses.replace(plan, duration_s=args.duration)
    return args, plan


def main() -> int:
    args, plan = parse_args()
    if args.workload == "mixed":
        from bench.servebench.mixed import run_mixed
        return run_mixed(args)
    if args.doc and args.doc_from:
        with open(args.doc_from) as f:
            results = json.load(f)
        write_doc(args.doc, results, results["command"], args.doc_section)
        print(f"regenerated {args.doc} from {args.doc_from}")
        return 0
    out = common.out_dir(args.out, "serve")
    command = "python -m bench.serve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    from fmplexd.families.embedded import embedded_path
    from testkit.launch import short_tmpdir
    work = short_tmpdir("fmx-serve-")
    bank = taskdefs.TaskBank(work, embedded_path("minilm"))
    budget_mib = args.budget_gib * 1024
    results: dict = {"command": command, "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
                     "plan": {**dataclasses.asdict(plan), "budget_gib": args.budget_gib},
                     "device": {"baselines": args.device, "fmplex": "cpu"}, "systems": {}}
    try:
        tasks = bank.first(plan.n_tasks)
        results["tasks"] = taskdefs.describe(tasks)
        results["baseline_serving"] = baselines.SERVING

        log("batch-1 latency of a dedicated instance")
        b1 = measure_b1(bank, plan, WorkloadSpec(n_tasks=1, total_rate=1, duration_s=1), args.device)
        results["b1_ms_by_tokens"] = b1["by_tokens_ms"]
        results["b1_median_ms_by_tokens"] = b1["median_by_tokens_ms"]
        ref = b1_reference(b1.pop("table_s"))
        log(f"  {b1['by_tokens_ms']}")

        log(f"fmplex: daemon + {plan.n_tasks} task processes")
        fm = Fmplex(bank, args.daemon_threads, config=args.daemon_config).start()
        try:
            fm_points = [(1, fmplex_memory_point(fm, 1, log)[1])]
            run_async(fm.deploy(tasks[1:]))
            sat = run_async(saturation(fm, plan))
            loads = [round(f * sat, 2) for f in plan.load_fractions]
            results.update(saturation_rps=round(sat, 2), loads_rps=loads)
            log(f"  fmplex saturation {sat:.1f} req/s -> offered loads {loads} req/s")
            results["systems"]["fmplex"] = serve_runs(fm, plan, loads, ref, log)
            results["systems"]["fmplex"]["task_restarts"] = fm.restarts()
            fm_points.append((plan.n_tasks, results["systems"]["fmplex"]["memory"]["total_mib"]))
            results["placement"] = {"fmplex": fm.describe()}
            log("fmplex capacity within the memory budget")
            cap = {"fmplex": fmplex_capacity(fm, plan, fm_points, budget_mib, log)}
        finally:
            fm.stop()

        for name in ("co-located", "partitioned"):
            log(f"{name}: {plan.n_tasks} model instances")
            bl = Baselines(name, args.device, args.partition,
                           threads=args.colocated_threads if name == "co-located" else 0)
            try:
                bl.start(tasks)
                results["placement"][name] = bl.placement
                results["systems"][name] = serve_runs(bl, plan, loads, ref, log)
            finally:
                bl.stop()

        probes = {s: results["systems"][s].pop("probe") for s in SYSTEMS}
        results["outputs_agree"] = outputs_agree(probes)
        results["probe_outputs"] = probes

        log("baseline capacity within the memory budget")
        for name in ("co-located", "partitioned"):
            pts = [(1, b1["pss_mib"]), (plan.n_tasks, results["systems"][name]["memory"]["total_mib"])]
            cap[name] = baseline_capacity(name, bank, pts, plan, budget_mib, args.device, log)
        results["capacity"] = cap
        results["capacity_note"] = capacity.NOTE

        if not args.no_profile:
            log("profile of the daemon's loop")
            from bench import profile_daemon
            results["profile"] = profile_daemon.profile(n_tasks=plan.n_tasks,
                                                        batches=plan.profile_batches,
                                                        threads=args.daemon_threads,
                                                        bank=bank)
        results["workload"] = workload(plan)
        results["headline"] = {"alpha": HEADLINE_ALPHA, "load_fraction": plan.headline_load}
        results["goals"] = goals(results, plan)
        results["notes"] = notes(results)
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        results["plots"] = [os.path.basename(p) for p in plot(out, results)]
        results["machine"] = common.machine()
        results["processes_left"] = leftovers()
        common.write_json(out, "serve.json", results)
        if args.doc:
            write_doc(args.doc, results, command, args.doc_section)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head, rows, ghead, grows = tables(results)
    common.print_table(*capacity_table(results), title="Memory and capacity")
    common.print_table(head, rows, title=f"Serving ({plan.n_tasks} tasks, {results['wall_s']:.0f} s)")
    common.print_table(ghead, grows, title="Goals")
    return 0


if __name__ == "__main__":
    sys.exit(main())

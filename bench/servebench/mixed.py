"""The mixed-family serving benchmark (`python -m bench.serve --workload mixed [--quick]`): tasks
of every family (text, vision, time series: bench/servebench/mixed_tasks.py) under one zipf
popularity, served by

  fmplex     one fmplexd hosting all-MiniLM-L6-v2, DINOv2-small and Fracast-0 and one task process
             per task: every task of every backbone under one fair scheduler
  per-task   one process per task (bench/family_baseline.py): its own copy of its backbone and its
             own engine, all processes on all cores (co-located)

Phases, on each system in turn: start, warm up (every task answers twice); the offered loads
(fractions of fmplex's saturation throughput, a closed burst of the same mix) as open-loop Poisson
runs: latency percentiles per family; memory (PSS of every process of the system) per task;
fairness: every task kept backlogged (`depth` requests in flight each) for `fair_s` seconds, and
each family's share of the device time over that window (fmplex: the daemon's device_ms per
task, a batch's forward time split by its requests' costs; per-task: the instances' CPU time)
against its share of the weights. Writes serve-mixed.json and prints markdown tables, the
fairness table last.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from bench import common
from bench.servebench.baselines import Baselines, _die_with_parent
from bench.servebench.driver import burst, drive, run_async
from bench.servebench.fmplex_system import Fmplex
from bench.servebench.metrics import leftovers, percentiles, pss_total
from bench.servebench.mixed_tasks import (BACKBONES, FAMILIES, NAMES, Inputs, MixedTask,
                                          write_mixed_task)
from bench.servebench.plan import REFS
from bench.workload import Event, WorkloadSpec, generate


@dataclass(frozen=True, slots=True)
class MixedPlan:
    n_tasks: int
    alpha: float
    load_fractions: tuple[float, ...]     # of fmplex's saturation throughput
    duration_s: float                     # arrivals per load point
    drain_s: float
    saturation_requests: int
    fair_s: float                         # the backlogged window measured
    depth: int                            # requests in flight per task while backlogged


MIXED_FULL = MixedPlan(n_tasks=12, alpha=0.9, load_fractions=(0.3, 0.6), duration_s=30.0,
                       drain_s=30.0, saturation_requests=120, fair_s=30.0, depth=16)
MIXED_QUICK = MixedPlan(n_tasks=3, alpha=0.9, load_fractions=(0.5,), duration_s=6.0,
                        drain_s=20.0, saturation_requests=24, fair_s=8.0, depth=12)


class MixedFmplex(Fmplex):
    """fmplex with the three backbones; requests are Payloads (mixed_tasks.Payload)."""

    def __init__(self, threads: int = 0):
        super().__init__(None, threads, {NAMES[f]: BACKBONES[f] for f in FAMILIES},
                         config="liveness_ms = 5000")

    async def infer(self, task: int, payload, timeout_s: float):
        return await self.call(task, payload.message(next(REFS), timeout_s), timeout_s)

    def usage(self) -> dict[str, float]:
        """Device seconds each task's requests took so far (the daemon's accounting)."""
        return {t.name: t.device_ms / 1e3 for t in self.daemon.tasks().values()}


class PerTask(Baselines):
    """One bench/family_baseline.py process per task, co-located on every core."""

    def __init__(self, threads: int = 0):
        super().__init__("per-task", threads=threads)
        self.names: list[str] = []

    def _spawn(self, t: MixedTask, p) -> None:
        import os
        import subprocess
        import sys

        from bench.servebench.baselines import ROOT
        endpoint = f"ipc://{self.dir}/{t.name}.sock"
        cmd = [sys.executable, "-m", "bench.family_baseline", "--spec", t.spec_path,
               "--backbone", BACKBONES[t.family], "--endpoint", endpoint,
               "--threads", str(p.threads)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        with open(os.path.join(self.dir, f"{t.name}.log"), "wb") as log:
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                               stderr=log, preexec_fn=_die_with_parent))
        self.endpoints.append(endpoint)
        self.names.append(t.name)

    async def infer(self, task: int, payload, timeout_s: float):
        return await self.client.call(task, payload.message(next(REFS), timeout_s), timeout_s)

    def usage(self) -> dict[str, float]:
        """CPU seconds each instance used so far (its share of the machine)."""
        import psutil
        out = {}
        for name, p in zip(self.names, self.procs):
            t = psutil.Process(p.pid).cpu_times()
            out[name] = t.user + t.system + t.children_user + t.children_system
        return out


def _events(tasks: list[MixedTask], inputs: Inputs, spec: WorkloadSpec, n: int | None = None
            ) -> list[Event]:
    """The workload's arrivals (or n time-less ones for a burst), each with its task's payload."""
    if n is None:
        evs = generate(spec)
    else:
        owners = np.random.default_rng(spec.seed + 3).choice(len(tasks), n, p=spec.shares())
        evs = [Event(0.0, int(k), 0, "") for k in owners]
    return [dataclasses.replace(e, text=inputs.payload(tasks[e.task].family)) for e in evs]


async def _warm(system, tasks: list[MixedTask], inputs: Inputs) -> None:
    for _ in range(2):
        await asyncio.gather(*(system.infer(i, inputs.payload(t.family), 600)
                               for i, t in enumerate(tasks)))


async def _saturation(system, tasks: list[MixedTask], inputs: Inputs, plan: MixedPlan) -> float:
    """Completed requests per second of a closed burst of the mix, after a warm-up."""
    await system.open(900)
    try:
        await _warm(system, tasks, inputs)
        spec = WorkloadSpec(n_tasks=len(tasks), alpha=plan.alpha)
        return await burst(system, _events(tasks, inputs, spec, plan.saturation_requests), 900)
    finally:
        await system.close()


async def _backlogged(system, tasks: list[MixedTask], inputs: Inputs, plan: MixedPlan) -> dict:
    """Every task kept `depth` requests deep; usage measured over `fair_s` once all are busy."""
    stop, done = asyncio.Event(), [0] * len(tasks)

    async def worker(i: int) -> None:
        while not stop.is_set():
            try:
                await system.infer(i, inputs.payload(tasks[i].family), 600)
                done[i] += 1
            except Exception:                 # counted as not done; the window goes on
                await asyncio.sleep(0.01)
    workers = [asyncio.create_task(worker(i)) for i in range(len(tasks)) for _ in range(plan.depth)]
    await asyncio.sleep(min(5.0, plan.fair_s / 2))
    before, t0 = await asyncio.to_thread(system.usage), time.perf_counter()
    counted = list(done)
    await asyncio.sleep(plan.fair_s)
    after, wall = await asyncio.to_thread(system.usage), time.perf_counter() - t0
    served = [d - c for d, c in zip(done, counted)]
    stop.set()
    await asyncio.gather(*workers)
    used = {t.name: after.get(t.name, 0.0) - before.get(t.name, 0.0) for t in tasks}
    return {"window_s": round(wall, 2), "usage_s": {k: round(v, 3) for k, v in used.items()},
            "requests": {t.name: n for t, n in zip(tasks, served)}}


def _shares(tasks: list[MixedTask], fair: dict) -> dict:
    """Per family: share of the weights, share of the usage, and their ratio."""
    total_w = sum(t.weight for t in tasks)
    total_u = sum(fair["usage_s"].values()) or 1.0
    out = {}
    for f in FAMILIES:
        mine = [t for t in tasks if t.family == f]
        if not mine:
            continue
        w = sum(t.weight for t in mine) / total_w
        u = sum(fair["usage_s"][t.name] for t in mine) / total_u
        out[f] = {"weight_share": round(w, 3), "usage_share": round(u, 3),
                  "ratio": round(u / w, 3)}
    return out


def _per_family(tasks: list[MixedTask], records) -> dict:
    out = {}
    for f in FAMILIES:
        lat = np.array([r.latency_s for r in records if tasks[r.task].family == f])
        ok = sum(1 for r in records if tasks[r.task].family == f and r.ok)
        out[f] = {"requests": int(len(lat)), "completed": ok, "failed": int(len(lat) - ok),
                  **percentiles(lat)}
    return out


def _run_system(system, tasks, inputs, plan: MixedPlan, loads, log) -> dict:
    async def body():
        await system.open(600)
        try:
            await _warm(system, tasks, inputs)
            runs = []
            for k, load in enumerate(loads):
                spec = WorkloadSpec(n_tasks=len(tasks), alpha=plan.alpha, total_rate=load,
                                    duration_s=plan.duration_s, seed=100 + k)
                records, lag = await drive(system, _events(tasks, inputs, spec),
                                           plan.duration_s + plan.drain_s)
                fam = _per_family(tasks, records)
                runs.append({"load_rps": load, "send_lag_p99_s": round(lag, 3), "families": fam})
                log(f"  {system.name} at {load:.2f} req/s: " + ", ".join(
                    f"{f} p99 {v['p99_ms']} ms ({v['failed']} failed)" for f, v in fam.items()))
            fair = await _backlogged(system, tasks, inputs, plan)
            return runs, fair
        finally:
            await system.close()
    runs, fair = run_async(body())
    memory = pss_total(system.pids())
    return {"runs": runs, "fairness": {**fair, "families": _shares(tasks, fair)},
            "memory": {**memory, "per_task_mib": round(memory["total_mib"] / len(tasks), 1)}}


def run_mixed(args) -> int:
    plan = MIXED_QUICK if args.quick else MIXED_FULL
    plan = dataclasses.replace(plan, n_tasks=args.tasks or plan.n_tasks,
                               duration_s=args.duration or plan.duration_s,
                               alpha=float(args.alphas.split(",")[0]) if args.alphas else plan.alpha)
    out = common.out_dir(args.out, "serve-mixed")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    from testkit.launch import short_tmpdir
    work = short_tmpdir("fmx-mixed-")
    tasks = [write_mixed_task(work, i) for i in range(plan.n_tasks)]
    inputs = Inputs()
    import shlex
    import sys
    results: dict = {"command": "python -m bench.serve " + " ".join(map(shlex.quote, sys.argv[1:])),
                     "plan": dataclasses.asdict(plan),
                     "tasks": [dataclasses.asdict(t) | {"spec_path": None} for t in tasks],
                     "backbones": BACKBONES, "systems": {}}
    log(f"fmplex: one daemon, {len(tasks)} tasks of {len(FAMILIES)} families")
    fm = MixedFmplex(args.daemon_threads).start()
    try:
        run_async(fm.deploy(tasks))
        sat = run_async(_saturation(fm, tasks, inputs, plan))
        loads = [round(f * sat, 3) for f in plan.load_fractions]
        results.update(saturation_rps=round(sat, 3), loads_rps=loads)
        log(f"  saturation {sat:.2f} req/s -> offered loads {loads} req/s")
        results["systems"]["fmplex"] = _run_system(fm, tasks, inputs, plan, loads, log)
    finally:
        fm.stop()
    log(f"per-task: {len(tasks)} processes, each its own backbone copy and engine")
    pt = PerTask(args.colocated_threads)
    try:
        pt.start(tasks, timeout_s=900)
        results["systems"]["per-task"] = _run_system(pt, tasks, inputs, plan, loads, log)
    finally:
        pt.stop()
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["processes_left"] = leftovers()
    common.write_json(out, "serve-mixed.json", results)
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    for title, (head, rows) in tables(results).items():
        common.print_table(head, rows, title=title)
    return 0


def tables(results: dict) -> dict[str, tuple[list, list]]:
    """Latency per family, memory per task, and fairness (printed last)."""
    systems = results["systems"]
    lat = []
    for name, s in systems.items():
        for run in s["runs"]:
            for f, v in run["families"].items():
                lat.append([f"{run['load_rps']:.2f}", name, f, v["requests"], v["failed"],
                            _ms(v["p50_ms"]), _ms(v["p99_ms"])])
    mem = [[name, len(results["tasks"]), s["memory"]["total_mib"], s["memory"]["per_task_mib"]]
           for name, s in systems.items()]
    fair = []
    for f in FAMILIES:
        row = [f]
        for name, s in systems.items():
            v = s["fairness"]["families"].get(f)
            if v is None:
                continue
            if len(row) == 1:
                row.append(v["weight_share"])
            row += [v["usage_share"], v["ratio"]]
        fair.append(row)
    fair_head = ["family", "weight share"] + [h for name in systems
                                              for h in (f"{name} share", f"{name} share/weight")]
    n = len(results["tasks"])
    return {
        f"Mixed families: latency per family ({n} tasks, zipf alpha {results['plan']['alpha']})":
            (["load req/s", "system", "family", "requests", "failed", "p50 ms", "p99 ms"], lat),
        "Memory (PSS of every process of the system)":
            (["system", "tasks", "total MiB", "MiB per task"], mem),
        f"Device time across families, every task backlogged ({results['plan']['fair_s']:g} s; "
        "fmplex: device time; per-task: CPU time)": (fair_head, fair),
    }


def _ms(v) -> str:
    return "failed" if v is None or (isinstance(v, float) and math.isinf(v)) else f"{v:.0f}"

"""Noisy-neighbour benchmark with real processes: do quiet tasks keep their latency when one task
floods the daemon? (goal: each quiet task's p99 in phase B <= 1.3x its p99 in phase A)

    python -m bench.fairness [--quick] [--out DIR]

A real fmplexd (testkit.launch.DaemonProcess; the embedded all-MiniLM-L6-v2, or with --quick a tiny
random checkpoint from testkit.tiny) and 4 text-embedding tasks of equal weight deployed through
the control socket (Deploy), each a real task process. Clients are separate processes (one per task,
asyncio), so that the flooder's client does not share an interpreter with the quiet ones. Where
fmplexd gave each task a cgroup, each client joins its task's (a tenant's processes share its CPU
weight, as in a systemd user slice; --clients-outside leaves them in the benchmark's own group,
where one flooding client outweighs every task process together).

  capacity  every task closed-loop (DEPTH requests in flight each): saturation throughput C
  phase A   tasks q0..q2 each offered Poisson arrivals at LOAD * C / 4 (open loop), q3 idle
  phase B   the same arrivals (same seeds), plus q3 ("flood") offered FLOOD x its share
The phases alternate in BLOCKS pairs (A1 B1 A2 B2 ...; each pair's quiet arrivals the same in A
and B) and each phase's latencies are pooled over its blocks, so that a slow spell of a shared
host falls on both phases rather than on whichever ran in it (one pair with --quick).
Latency is measured from each request's scheduled arrival to its reply (no coordinated omission).
One daemon per entry of POLICIES, one after the other, differing only in the scheduler's settings:
fmplexd's defaults (bounded idle credit, idle_credit_tokens = 512; batch_target_ms = 50), the strict
lift rule (K = 0), and the defaults with shorter batches. All get the arrivals of the first's
capacity, so the policies are compared on the same requests. A phase lasts 30 s, or longer where
needed for MIN_QUIET_REQUESTS arrivals per quiet task (a stable p99); --quick: 3 s.
Texts come from bench/workload.py (the shared workload generator): one text per request, lengths
lognormal (median 20 tokens).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench import common

import numpy as np

from bench import workload
from ipc.messages import Deploy
from testkit.launch import DaemonProcess, short_tmpdir

SEED = 0
TASKS = ["q0", "q1", "q2", "flood"]
LOAD = 0.6                    # quiet tasks together: 3/4 of LOAD * capacity
FLOOD = 20                    # the flooder's offered rate, in fair shares
GOAL = 1.3
DEPTH = 16                    # requests in flight per task while measuring capacity
QUIET_TIMEOUT_S = 10.0
POLICIES = (                  # (name, fmplexd.toml lines) of the daemons compared, in turn
    ("default", ""),                                   # bounded idle credit, K = 512 tokens
    ("strict K=0", "idle_credit_tokens = 0"),
    ("20 ms batches", "batch_target_ms = 20"),
)
MIN_QUIET_REQUESTS = 1000     # per quiet task and phase: a p99 of at least this many requests
BLOCKS = 3                    # A/B pairs each phase is split into (interleaved)
FLOOD_TIMEOUT_S = 2.0


# ------------------------------------------------------------------ client processes

def client_proc(conn, run_dir: str, task: str, times: list[float] | None, texts: list[str],
                timeout_s: float, duration_s: float, cgroups: list[str]) -> None:
    """One task's client. times given: open loop (request i at start + times[i]); times None:
    closed loop (DEPTH in flight until duration_s). Sends back [(outcome, latency_s)].
    `cgroups`: the cgroup.procs files of its task's cgroups, joined first (tenant_cgroups)."""
    import asyncio

    from fmplexd.cgroups import join
    join(cgroups)

    from ipc import aio
    from ipc.errors import FmplexError, OverloadedError, RequestTimeout
    from fmplex.client import AsyncClient

    async def warm_up(c) -> None:
        """Resolve and connect; a task restarted by the previous phase may still be coming up."""
        deadline = time.monotonic() + 60
        while True:
            try:
                await c.infer(task, ["warm up"])
                return
            except FmplexError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def main():
        async with AsyncClient(run_dir, timeout_s=timeout_s) as c:
            await warm_up(c)
            conn.send("ready")
            t0 = time.monotonic() + (conn.recv() - time.time())  # the common start (wall clock)
            out = []

            async def one(text: str, sched: float) -> None:
                try:
                    await c.infer(task, [text])
                    out.append(("ok", time.monotonic() - sched))
                except OverloadedError:
                    out.append(("overloaded", time.monotonic() - sched))
                except RequestTimeout:
                    out.append(("timeout", time.monotonic() - sched))
                except FmplexError as e:
                    out.append((e.code.value, time.monotonic() - sched))

            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            if times is None:
                async def worker(k: int) -> None:
                    i = k
                    while time.monotonic() < t0 + duration_s:
                        await one(texts[i % len(texts)], time.monotonic())
                        i += DEPTH
                await asyncio.gather(*(worker(k) for k in range(DEPTH)))
            else:
                calls = []
                for t, text in zip(times, texts):
                    delay = t0 + t - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    calls.append(asyncio.create_task(one(text, t0 + t)))
                await asyncio.gather(*calls)
            conn.send(out)

    try:
        aio.run(main())
    except BaseException as e:          # tell the parent rather than leave it waiting
        conn.send(f"failed: {e!r}")
        raise


def tenant_cgroups(pid: int) -> list[str]:
    """The cgroup.procs files of the cgroups fmplexd made for the task process `pid` (fmplexd.
    cgroups: v1 `.../fmplexd-<pid>:<task>`, v2 `.../task:<task>`); [] where it has none. A
    tenant's client joins them: on one host, a tenant's own processes share its CPU weight (as
    systemd puts each user's processes in a slice), rather than outweighing every task together."""
    from fmplexd.cgroups import mounts_by_controller, process_cgroups
    mounts, out = mounts_by_controller(), []
    for controller, path in process_cgroups(pid).items():
        name = controller or "cgroup2"
        if ("/fmplexd-" in path or "/task:" in path) and name in ("cpu", "memory", "cgroup2") \
                and name in mounts:
            out.append(os.path.join(mounts[name], path.lstrip("/"), "cgroup.procs"))
    return out


def run_clients(run_dir: str, plans: dict[str, tuple], duration_s: float,
                cgroups: dict[str, list[str]] | None = None) -> dict[str, list]:
    """Start one client process per task of plans[task] = (times | None, texts, timeout_s), release
    them together, and return each task's outcomes. Forked: no zmq context is open here then, and
    a fork starts in milliseconds where a spawn re-imports everything."""
    ctx = mp.get_context("fork")
    procs = {}
    for task, (times, texts, timeout_s) in plans.items():
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=client_proc, daemon=True,
                        args=(theirs, run_dir, task, times, texts, timeout_s, duration_s,
                              (cgroups or {}).get(task, [])))
        p.start()
        procs[task] = (p, ours)
    try:
        for task, (p, conn) in procs.items():
            said = conn.recv() if conn.poll(120) else "nothing within 120 s"
            if said != "ready":
                raise RuntimeError(f"client of {task} did not start: {said}")
        start = time.time() + 0.3
        for _, conn in procs.values():
            conn.send(start)
        limit = duration_s + 2 * max(t for _, _, t in plans.values()) + 60
        results = {}
        for task, (p, conn) in procs.items():
            said = conn.recv() if conn.poll(limit) else "nothing"
            if not isinstance(said, list):
                raise RuntimeError(f"client of {task} sent no results: {said}")
            results[task] = said
        return results
    finally:
        for p, conn in procs.values():
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
            conn.close()


# ------------------------------------------------------------------ workload and statistics

def texts_for(task_index: int, n: int, phase_seed: int) -> list[str]:
    spec = workload.WorkloadSpec(seed=SEED)
    rng = np.random.default_rng([SEED, task_index, phase_seed])
    return [workload.make_text(rng, int(k)) for k in workload.lengths(rng, spec, n)]


def arrivals(task_index: int, rate: float, duration_s: float, block: int = 0
             ) -> tuple[list[float], list[str]]:
    """Poisson arrivals and texts of one task in one block; the same in both phases (same seeds)."""
    rng = np.random.default_rng([SEED, task_index, 1, block])
    times = [float(t) for t in workload.arrival_times(rng, rate, duration_s)]
    return times, texts_for(task_index, len(times), 2 + 10 * block)


def summarise(outcomes: list, duration_s: float, offered: float) -> dict:
    ok = np.array([lat for kind, lat in outcomes if kind == "ok"]) * 1e3
    kinds: dict[str, int] = {}
    for kind, _ in outcomes:
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"offered_rps": offered, "sent": len(outcomes), "ok": int(ok.size),
            "completed_rps": ok.size / duration_s, "outcomes": kinds,
            "p50_ms": float(np.percentile(ok, 50)) if ok.size else float("nan"),
            "p99_ms": float(np.percentile(ok, 99)) if ok.size else float("nan")}


# ------------------------------------------------------------------ the benchmark

def failures(r: dict) -> str:
    out = [f"{k} {v}" for k, v in sorted(r["outcomes"].items()) if k != "ok"]
    return ", ".join(out + ([f"restarts {r['restarts']}"] if r["restarts"] else []))


def _ms(r: dict) -> str:
    return "-" if not r["ok"] else f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"


def deploy_all(d: DaemonProcess, specs: str) -> None:
    """Deploy every task at once (Deploy is answered once the task serves)."""
    def deploy(name: str) -> None:
        path = os.path.join(specs, f"{name}.toml")
        with open(path, "w") as f:
            f.write(f'name = "{name}"\npipeline = "text-embedding"\nweight = 1.0\n')
        with open(path) as f, d.client(timeout_s=120) as c:
            c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)

    with ThreadPoolExecutor(len(TASKS)) as pool:
        list(pool.map(deploy, TASKS))


def daemon_stats(d: DaemonProcess) -> dict[str, dict]:
    return {t.name: {"requests": t.requests, "overloaded": t.overloaded, "timeouts": t.timeouts,
                     "pid": t.pid, "restarts": t.restarts} for t in d.tasks().values()}


def daemon_delta(before: dict, after: dict) -> dict:
    """The daemon's count of a task's overloads and timeouts in a phase (None if the task was
    restarted meanwhile: its counters start again with each session) and its restarts."""
    restarts = after["restarts"] - before["restarts"]
    return {k: None if restarts else after[k] - before[k] for k in ("overloaded", "timeouts")} \
        | {"restarts": restarts}


def _summed(deltas: list[dict]) -> dict:
    """daemon_delta over a phase's blocks: counts summed (None if any block's is None)."""
    out = {}
    for k in deltas[0]:
        values = [d[k] for d in deltas]
        out[k] = None if any(v is None for v in values) else sum(values)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):   # gone (also while being read)
        return False


def run_policy(backbone: str, work: str, policy: tuple[str, str], cap_s: float, phase_s: float,
               capacity: float | None, out: str, quick: bool = False,
               clients_outside: bool = False) -> dict:
    """One daemon configured by policy = (name, toml): its capacity (unless given, so that all
    policies see the same arrivals), then phases A and B. If a task was restarted, the daemon's
    and tasks' logs are kept in out/fairness-restarts-{index of the policy}.log."""
    name, toml = policy
    d = DaemonProcess(backbone, config=toml)
    pids: set[int] = set()
    phases: dict[str, dict] = {}
    try:
        d.start()
        deploy_all(d, work)
        stats = daemon_stats(d)
        pids.update(s["pid"] for s in stats.values())
        groups = {} if clients_outside else {t: tenant_cgroups(s["pid"]) for t, s in stats.items()}
        if capacity is None:                       # every task closed-loop
            cap = run_clients(d.run_dir, {t: (None, texts_for(i, 256, 0), QUIET_TIMEOUT_S)
                                          for i, t in enumerate(TASKS)}, cap_s, groups)
            capacity = sum(k == "ok" for o in cap.values() for k, _ in o) / cap_s
        share = LOAD * capacity / len(TASKS)
        print(f"{name}: capacity {capacity:.1f} req/s; quiet tasks at {share:.1f} req/s each",
              file=sys.stderr, flush=True)
        if not quick:
            phase_s = max(phase_s, MIN_QUIET_REQUESTS / share)
        blocks = 1 if quick else BLOCKS
        block_s = phase_s / blocks
        pooled: dict[str, dict[str, list]] = {"A": {}, "B": {}}      # phase -> task -> outcomes
        offered: dict[str, dict[str, int]] = {"A": {}, "B": {}}
        deltas: dict[str, dict[str, list]] = {"A": {}, "B": {}}
        for k in range(blocks):
            quiet = {t: (*arrivals(i, share, block_s, k), QUIET_TIMEOUT_S)
                     for i, t in enumerate(TASKS[:3])}
            flood = {TASKS[3]: (*arrivals(3, FLOOD * share, block_s, k), FLOOD_TIMEOUT_S)}
            for phase, plans in (("A", quiet), ("B", {**quiet, **flood})):
                before = daemon_stats(d)
                res = run_clients(d.run_dir, plans, block_s, groups)
                after = daemon_stats(d)
                pids.update(s["pid"] for s in after.values())
                for t in plans:
                    pooled[phase].setdefault(t, []).extend(res[t])
                    offered[phase][t] = offered[phase].get(t, 0) + len(plans[t][0])
                    deltas[phase].setdefault(t, []).append(daemon_delta(before[t], after[t]))
        for phase in ("A", "B"):
            phases[phase] = {t: {**summarise(out, phase_s, offered[phase][t] / phase_s),
                                 **_summed(deltas[phase][t])} for t, out in pooled[phase].items()}
            print(f"{name} phase {phase} ({blocks} block(s)): " + ", ".join(
                f"{t} p99 {r['p99_ms']:.1f} ms" for t, r in phases[phase].items()),
                file=sys.stderr, flush=True)
    finally:
        if any(r.get("restarts") for ph in phases.values() for r in ph.values()):
            with open(os.path.join(out, f"fairness-restarts-{POLICIES.index(policy)}.log"),
                      "w") as f:
                f.write(d.logs(tail=50_000))
        d.cleanup()
    pass_ = {t: phases["B"][t]["p99_ms"] <= GOAL * phases["A"][t]["p99_ms"] for t in TASKS[:3]}
    return {"policy": name, "config": toml, "capacity_rps": capacity, "share_rps": share,
            "phase_s": phase_s, "blocks": blocks, "clients_in_tenant_cgroups": any(groups.values()),
            "phases": phases, "pass": pass_, "task_pids": sorted(pids)}


def rows_of(run: dict) -> list[list[str]]:
    phases, rows = run["phases"], []
    for t in TASKS:
        a, b = phases["A"].get(t), phases["B"][t]
        errors = "; ".join(f"{ph}: {failures(r)}" for ph, r in (("A", a), ("B", b))
                           if r is not None and failures(r))
        rows.append([
            run["policy"], t,
            f"{a['offered_rps'] if a else 0:.1f} / {b['offered_rps']:.1f}",
            f"{a['completed_rps'] if a else 0:.1f} / {b['completed_rps']:.1f}",
            f"{a['p50_ms']:.1f} / {a['p99_ms']:.1f}" if a else "-", _ms(b),
            f"{b['p99_ms'] / a['p99_ms']:.2f}x" if a else "-",
            common.verdict(run["pass"][t]) if a else "(flooder)", errors or "none"])
    return rows


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--clients-outside", action="store_true",
                    help="leave the client processes out of their tasks' cgroups")
    ap.add_argument("--policies", default="",
                    help="comma-separated names of POLICIES to run (default: all)")
    args = ap.parse_args()
    out = common.out_dir(args.out, "fairness")
    cap_s, phase_s = (1.5, 3.0) if args.quick else (8.0, 30.0)
    work = short_tmpdir("fmx-fair-")
    if args.quick:
        from testkit.tiny import write_tiny
        backbone, label = write_tiny(os.path.join(work, "tiny")), "tiny bert (testkit.tiny)"
    else:
        backbone, label = "embedded", "all-MiniLM-L6-v2 (embedded)"
    runs, capacity = [], None
    try:
        wanted = [p for p in POLICIES if not args.policies or p[0] in args.policies.split(",")]
        for policy in wanted:
            runs.append(run_policy(backbone, work, policy, cap_s, phase_s, capacity, out,
                                    args.quick, args.clients_outside))
            capacity = runs[0]["capacity_rps"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    left = sorted(p for r in runs for p in r["task_pids"] if p and _alive(p))
    common.write_json(out, "fairness.json", {
        "backbone": label, "quick": args.quick, "seed": SEED, "load": LOAD, "flood_shares": FLOOD,
        "goal_p99_ratio": GOAL, "capacity_s": cap_s, "phase_s": phase_s, "runs": runs,
        "processes_left": left})
    m = common.machine()
    common.print_table(["policy", "task", "offered req/s A / B", "completed req/s A / B",
                        "A p50 / p99 ms", "B p50 / p99 ms", "p99 B/A", f"p99 B <= {GOAL}x A",
                        "failed requests, restarts"], [r for run in runs for r in rows_of(run)],
                       title=f"fairness: {label}, capacity {capacity:.1f} req/s, quiet share "
                             f"{runs[0]['share_rps']:.1f} req/s, flooder {FLOOD}x; K = "
                             f"idle_credit_tokens, 20 ms = batch_target_ms; "
                             f"load {m['loadavg_1m']} on {m['cpus']} cpus; processes left: "
                             f"{len(left)}; phase {runs[0]['phase_s']:.0f} s in {runs[0]['blocks']} "
                             f"interleaved block(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

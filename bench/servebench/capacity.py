"""Capacity within the memory budget: how many tasks each system hosts in --budget-gib of PSS.

Memory points (tasks, total PSS MiB) are fitted as fixed + per task (metrics.fit_line) and
extrapolated to the budget. In the full run the extrapolation is then verified where feasible:
fmplex deploys that many tasks on the same daemon (up to plan.verify_max_fmplex, within
VERIFY_LIMIT_S), co-located starts that many instances (up to plan.verify_max_baseline, if the
machine has the memory); each hosted task must answer a request, and tasks are removed while the
total is over budget. Each function returns serve.json's capacity entry of its system ("hosted",
"verified", the fit and the points)."""
from __future__ import annotations

import math
import time

from bench.servebench.baselines import Baselines
from bench.servebench.driver import answer_all, run_async
from bench.servebench.fmplex_system import Fmplex
from bench.servebench.metrics import fit_line, pss_total
from bench.servebench.plan import MIB, VERIFY_LIMIT_S, Plan
from bench.servebench.tasks import TaskBank
from bench.workload import WorkloadSpec

NOTE = ("fmplex: fixed + per-task memory fitted on 1.. tasks deployed on one daemon, "
        "then the extrapolated number deployed and each asked one request (verified) where "
        "feasible; baselines: a line through 1 process (the dedicated instance) and N "
        "processes; co-located verified by starting that many in the full run where memory "
        "allows, otherwise an extrapolation (marked)")


def fmplex_memory_point(system: Fmplex, n: int, log, deadline: float = math.inf
                        ) -> tuple[int, float]:
    """Deploy up to n tasks (in waves of 16, stopping with TimeoutError past `deadline`), have
    each answer one request, return (answered, total PSS MiB)."""
    async def grow() -> int:
        while len(system.tasks) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(system.tasks)} of {n} tasks deployed in time")
            wave = system.bank.first(min(n, len(system.tasks) + 16))[len(system.tasks):]
            await system.deploy(wave, concurrency=4)
        await system.open(120)
        try:
            return await answer_all(system, n, WorkloadSpec(n_tasks=1, total_rate=1, duration_s=1),
                                    errors)
        finally:
            await system.close()
    errors: dict[str, int] = {}
    answered = run_async(grow())
    mem = pss_total(system.pids())
    if errors:
        log(f"  tasks that did not answer, by their last error: {errors}")
    log(f"  fmplex memory: {n} tasks ({answered} answered): {mem['total_mib']:.0f} MiB (daemon "
        f"{mem['daemon']['pss_mib']:.0f}, task processes {mem['tasks']['mean_pss_mib']:.1f} each)")
    return answered, mem["total_mib"]


def fmplex_capacity(system: Fmplex, plan: Plan, points: list[tuple[int, float]],
                    budget_mib: float, log) -> dict:
    """More points on the same daemon, fit fixed + per task, extrapolate; verify where feasible:
    deploy that many, each answers a request, remove tasks while the total is over budget."""
    from ipc.errors import FmplexError
    out: dict = {}
    try:
        for n in plan.capacity_points:
            if n > len(system.tasks):
                points.append((n, fmplex_memory_point(system, n, log)[1]))
    except FmplexError as e:
        out["deploy_error"] = f"growing to more tasks failed: {e}"
        log(f"  {out['deploy_error']}")
    fixed, per_task = fit_line(points)
    predicted = int((budget_mib - fixed) // per_task)
    out.update({"points": points, "fixed_mib": round(fixed, 1), "per_task_mib": round(per_task, 2),
                "extrapolated": predicted, "verified": False, "hosted": predicted})
    if not (plan.verify_capacity and len(system.tasks) < predicted <= plan.verify_max_fmplex
            and "deploy_error" not in out):
        return out
    t = time.perf_counter()
    deadline = time.monotonic() + VERIFY_LIMIT_S
    try:
        answered, total = fmplex_memory_point(system, predicted, log, deadline)
    except (FmplexError, TimeoutError) as e:
        out["deploy_error"] = f"deploying {predicted} tasks failed: {e}"
        log(f"  {out['deploy_error']}; keeping the extrapolation")
        return out
    n = predicted
    for _ in range(3):                             # room left: deploy more, measure again
        extra = int((budget_mib - total) // per_task)
        if extra < 1 or n + extra > plan.verify_max_fmplex:
            break
        n += extra
        try:
            answered, total = fmplex_memory_point(system, n, log, deadline)
        except (FmplexError, TimeoutError) as e:
            out["deploy_error"] = f"deploying {n} tasks failed: {e}"
            n = len(system.tasks)
            total = pss_total(system.pids())["total_mib"]
            break
    while total > budget_mib and n > 1:            # over budget: remove tasks until within
        drop = max(1, math.ceil((total - budget_mib) / per_task))
        for k in range(n - drop, n):
            system.remove(system.tasks[k].name)
        n -= drop
        system.tasks = system.tasks[:n]
        total = pss_total(system.pids())["total_mib"]
    out.update(verified=True, hosted=min(n, answered), answered=answered,
               verified_total_mib=total, verify_s=round(time.perf_counter() - t),
               restarts_seen=system.restarts())
    log(f"  fmplex capacity verified: {n} tasks running, {answered} answered, {total:.0f} MiB, "
        f"{out['restarts_seen']} task restarts seen")
    return out


def baseline_capacity(name: str, bank: TaskBank, points: list[tuple[int, float]], plan: Plan,
                      budget_mib: float, device: str, log) -> dict:
    fixed, per_task = fit_line(points)
    predicted = int((budget_mib - fixed) // per_task)
    out = {"points": points, "fixed_mib": round(fixed, 1), "per_task_mib": round(per_task, 2),
           "extrapolated": predicted, "verified": False, "hosted": predicted}
    if not (plan.verify_capacity and name == "co-located" and predicted <= plan.verify_max_baseline):
        return out
    import psutil
    if psutil.virtual_memory().available < 1.3 * budget_mib * MIB:
        out["not_verified_because"] = "not enough free memory on this machine to start them all"
        return out
    system = Baselines(name, device)
    t = time.perf_counter()
    spec = WorkloadSpec(n_tasks=1, total_rate=1, duration_s=1)

    def measure(n: int) -> tuple[int, float]:
        system.start(bank.first(n)[len(system.procs):], timeout_s=600)

        async def ask():
            await system.open(120)
            try:
                return await answer_all(system, n, spec)
            finally:
                await system.close()
        answered = run_async(ask())
        total = pss_total(system.pids())["total_mib"]
        log(f"  {name} capacity: {n} processes, {answered} answered, {total:.0f} MiB total")
        return answered, total

    try:
        n = predicted
        answered, total = measure(n)
        for _ in range(3):                       # room left: start more, measure again
            extra = int((budget_mib - total) // (total / n))
            if extra < 1 or n + extra > plan.verify_max_baseline:
                break
            n += extra
            answered, total = measure(n)
        while total > budget_mib and n > 1:      # over: stop instances until within
            drop = max(1, math.ceil((total - budget_mib) / (total / n)))
            system.stop_last(drop)
            n -= drop
            answered = min(answered, n)
            total = pss_total(system.pids())["total_mib"]
        out.update(verified=True, hosted=min(n, answered), answered=answered,
                   verified_total_mib=total, verify_s=round(time.perf_counter() - t))
    finally:
        system.stop()
    return out

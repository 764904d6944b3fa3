"""The load driver, in one asyncio process: open-loop runs, closed bursts and the short request
rounds around them (warm-up, output probes, settling, one answer per task).

Every function takes a started and opened system (Fmplex or Baselines: `await infer(task index,
text, timeout_s)`) and the workload of bench/workload.py. drive() sends each request at its
scheduled time whatever the replies and records latency = reply time - scheduled arrival (a failure
is a Record with latency inf and its error). run_async runs a coroutine on the project's event
loop (ipc.aio) from synchronous code."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from bench.servebench.plan import HEADLINE_ALPHA, Plan
from bench.workload import Event, WorkloadSpec, texts


def run_async(coro):
    from ipc import aio
    return aio.run(coro)


@dataclass(slots=True)
class Record:
    task: int
    tokens: int
    latency_s: float          # reply time - scheduled arrival (inf if failed)
    ok: bool
    done_at: float            # seconds from the start of the run
    error: str = ""


async def drive(system, events: list[Event], timeout_s: float) -> tuple[list[Record], float]:
    """Open loop: each request leaves at its scheduled time. Returns records and the send lag p99."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    records: list[Record | None] = [None] * len(events)
    lags = []

    async def one(k: int, ev: Event) -> None:
        due = t0 + ev.t
        try:
            await system.infer(ev.task, ev.text, timeout_s)
            now = loop.time()
            records[k] = Record(ev.task, ev.tokens, now - due, True, now - t0)
        except Exception as e:                       # typed errors and timeouts alike
            now = loop.time()
            records[k] = Record(ev.task, ev.tokens, math.inf, False, now - t0,
                                f"{type(e).__name__}: {e}"[:200])

    pending = []
    for k, ev in enumerate(events):
        delay = t0 + ev.t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(loop.time() - (t0 + ev.t))
        pending.append(loop.create_task(one(k, ev)))
    await asyncio.gather(*pending)
    return records, float(np.percentile(lags, 99)) if lags else 0.0


async def burst(system, events: list[Event], timeout_s: float) -> float:
    """Closed burst: all requests at once; completed requests per second until the last reply."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.gather(*(system.infer(e.task, e.text, timeout_s) for e in events),
                                   return_exceptions=True)
    wall = loop.time() - t0
    ok = sum(not isinstance(r, BaseException) for r in results)
    return ok / wall


async def warm_up(system, n_tasks: int, per_task: int, spec: WorkloadSpec) -> None:
    probes = texts(spec, n_tasks * per_task, seed_offset=7)
    await asyncio.gather(*(system.infer(i % n_tasks, e.text, 120) for i, e in enumerate(probes)))


async def probe_outputs(system, n_tasks: int, spec: WorkloadSpec) -> list:
    """Top label and score of a few fixed inputs per task (compared across systems)."""
    probes = texts(spec, 2 * n_tasks, seed_offset=11)
    replies = await asyncio.gather(*(system.infer(i % n_tasks, e.text, 120)
                                     for i, e in enumerate(probes)))
    return [(r.labels[0][0].label, r.labels[0][0].score) for r in replies]


async def settle(system, n_tasks: int) -> float:
    """Wait until every task has worked off what is still queued (a baseline instance keeps
    serving requests its client gave up on): one request per task, answered in FIFO order."""
    t = time.perf_counter()
    probes = texts(WorkloadSpec(n_tasks=n_tasks), n_tasks, seed_offset=17)
    await asyncio.gather(*(system.infer(i, e.text, 900) for i, e in enumerate(probes)),
                         return_exceptions=True)
    return time.perf_counter() - t


async def saturation(system, plan: Plan) -> float:
    """Closed burst of requests (the workload's popularity and lengths) after a warm-up."""
    spec = WorkloadSpec(n_tasks=plan.n_tasks, alpha=HEADLINE_ALPHA, total_rate=1, duration_s=1)
    await system.open(300)
    try:
        await warm_up(system, plan.n_tasks, plan.warmup_per_task, spec)
        evs = texts(spec, plan.saturation_requests, seed_offset=3)
        owners = np.random.default_rng(3).choice(plan.n_tasks, len(evs), p=spec.shares())
        evs = [dataclasses.replace(e, task=int(k)) for e, k in zip(evs, owners)]
        return await burst(system, evs, 300)
    finally:
        await system.close()


PROBES_AT_ONCE = 16       # answer_all's connections opened at a time


async def answer_all(system, n: int, spec: WorkloadSpec, errors: dict | None = None) -> int:
    """How many of the first n tasks answer one request each. PROBES_AT_ONCE at a time, each
    tried twice: opening hundreds of connections in the same second (each authenticated by its
    task process) would find tasks "unavailable" that serve, only slower to accept a connection
    than the client's grace (fmplex.client.CONNECT_GRACE_S). `errors`: counts of the last
    failure of each task that did not answer, by type."""
    probes = texts(spec, n, seed_offset=13)
    gate = asyncio.Semaphore(PROBES_AT_ONCE)

    async def probe(i: int, text: str):
        async with gate:
            try:
                return await system.infer(i, text, 120)
            except Exception:
                return await system.infer(i, text, 120)

    results = await asyncio.gather(*(probe(i, e.text) for i, e in enumerate(probes)),
                                   return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and errors is not None:
            errors[type(r).__name__] = errors.get(type(r).__name__, 0) + 1
    return sum(not isinstance(r, BaseException) for r in results)

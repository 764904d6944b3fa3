"""Result cache benchmark: a repeated-input workload against the same task with and without its
result cache (tasklets/cache.py).

One fmplexd on the embedded all-MiniLM-L6-v2 (--quick: a tiny random BERT) and two text-embedding
tasks with the same LoRA: `plain` (cache_mb = 0) and `cached` (cache_mb = 64). C closed-loop
clients send R requests each, one text per request, the text drawn zipf(s) over N distinct texts
(bench.workload.zipf_picks; 8-64 tokens each); the same request sequence goes to `plain`, then to
`cached` (cold at its start). Per task: client-side latency p50 / p99, requests per second, the
daemon's batches during the run (BackboneStats.batches), the requests the daemon ran, the task's
cache hits (its cache_stats) and bytes. Checked: every answer of `cached` for a text agrees with
its first one within 1e-6 (a hit is exactly the stored reply; two misses of one text in flight at
once are both computed, in different batches) and with `plain`'s within 1e-5 (batch composition
moves float sums).

    python -m bench.cache [--quick] [--out DIR] [--clients C] [--requests R] [--inputs N] [--zipf S]
                                                       (repo root; or `fmplex bench cache`)

Prints a markdown table last and writes cache.json to --out.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import time

import numpy as np

from bench import common, workload
from fmplex.client import AsyncClient
from ipc import aio
from ipc.messages import Info, ListTasks
from testkit.launch import DaemonProcess, TaskProc, short_tmpdir, write_spec
from testkit.tiny import write_random_lora, write_tiny

FULL = dict(clients=8, requests=250, inputs=1000, zipf=1.1)
QUICK = dict(clients=4, requests=40, inputs=100, zipf=1.1)
TOLERANCE = 1e-5                 # cached vs plain
REPEAT_TOLERANCE = 1e-6          # one text's answers on `cached`


def make_inputs(n: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    return [workload.make_text(rng, int(rng.integers(8, 65))) for _ in range(n)]


async def drive(run_dir: str, task: str, texts: list[str], picks: np.ndarray, clients: int):
    """Closed-loop clients over `picks` (client i takes every clients-th request): latencies (s)
    and the embedding answered for each pick."""
    latencies = np.zeros(len(picks))
    answers: list = [None] * len(picks)

    async def client(i: int, ac: AsyncClient) -> None:
        for j in range(i, len(picks), clients):
            t0 = time.perf_counter()
            reply = await ac.infer(task, [texts[picks[j]]])
            latencies[j] = time.perf_counter() - t0
            answers[j] = reply.embeddings[0]
    async with AsyncClient(run_dir, timeout_s=120) as ac:
        await ac.infer(task, ["warm up the connection"])
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, ac) for i in range(clients)))
        wall = time.perf_counter() - t0
    return latencies, answers, wall


def daemon_figures(d: DaemonProcess) -> tuple[int, dict]:
    with d.client() as c:
        batches = sum(b.batches for b in c.control(Info(ref=c.ref())).load)
        return batches, {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}


def run_one(d: DaemonProcess, task: str, texts, picks, clients: int) -> dict:
    batches0, stats0 = daemon_figures(d)
    lat, answers, wall = aio.run(drive(d.run_dir, task, texts, picks, clients))
    batches1, stats1 = daemon_figures(d)
    deadline = time.monotonic() + 10                 # cache counts arrive once per heartbeat
    while time.monotonic() < deadline and task == "cached" and \
            stats1[task].cache_hits + stats1[task].cache_misses < len(picks) + 1:
        time.sleep(0.1)
        _, stats1 = daemon_figures(d)
    s0, s1 = stats0[task], stats1[task]
    return {"task": task, "requests": len(picks), "wall_s": wall,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "requests_per_s": len(picks) / wall, "daemon_batches": batches1 - batches0,
            "daemon_requests": s1.requests - s0.requests - 1,          # (less the warm-up)
            "cache_hits": s1.cache_hits - s0.cache_hits, "cache_bytes": s1.cache_bytes,
            "answers": answers}


def main() -> int:
    ap = common.parser(__doc__)
    for k in ("clients", "requests", "inputs"):
        ap.add_argument(f"--{k}", type=int, default=None)
    ap.add_argument("--zipf", type=float, default=None)
    args = ap.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    plan.update({k: getattr(args, k) for k in plan if getattr(args, k) is not None})
    out = common.out_dir(args.out, "cache")
    work = short_tmpdir("fmx-bench-cache-")
    backbone = write_tiny(os.path.join(work, "bert"), "bert") if args.quick else "embedded"
    hidden = 32 if args.quick else 384
    write_random_lora(os.path.join(work, "lora"), 8, [0, 1], hidden, seed=1)
    d = DaemonProcess(backbone, config="liveness_ms = 5000").start()
    procs = []
    try:
        for name, extra in (("plain", ""), ("cached", "cache_mb = 64\n")):
            spec = write_spec(work, name, f'pipeline = "text-embedding"\n{extra}'
                                          '[extension]\nadapter = "lora"')
            procs.append(TaskProc(spec, d.run_dir).start())
        texts = make_inputs(plan["inputs"])
        n = plan["clients"] * plan["requests"]
        picks = workload.zipf_picks(np.random.default_rng(11), plan["inputs"], n, plan["zipf"])
        runs = {task: run_one(d, task, texts, picks, plan["clients"]) for task in ("plain", "cached")}
    finally:
        for p in procs:
            p.stop()
        d.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    first: dict[int, np.ndarray] = {}
    agree, close = True, True
    for j, k in enumerate(picks):
        cached, plain = runs["cached"]["answers"][j], runs["plain"]["answers"][j]
        agree &= bool(np.allclose(first.setdefault(int(k), cached), cached,
                                  atol=REPEAT_TOLERANCE))
        close &= bool(np.allclose(cached, plain, atol=TOLERANCE))
    for r in runs.values():
        del r["answers"]
    distinct = len(set(picks.tolist()))
    results = {"params": {**plan, "backbone": "tiny-bert" if args.quick else "all-MiniLM-L6-v2",
                          "distinct_inputs_drawn": distinct},
               "runs": runs, "check": {"repeats_within": REPEAT_TOLERANCE if agree else None,
                                       "equal_to_uncached_within": TOLERANCE if close else None}}
    common.write_json(out, "cache.json", results)
    rows = [[r["task"], r["requests"], r["cache_hits"], f"{100 * r['cache_hits'] / r['requests']:.0f}%",
             r["daemon_requests"], r["daemon_batches"], r["p50_ms"], r["p99_ms"],
             r["requests_per_s"]] for r in runs.values()]
    print(f"{n} requests over {plan['inputs']} texts (zipf s={plan['zipf']}, {distinct} distinct "
          f"drawn), {plan['clients']} clients; answers: cached agree within {REPEAT_TOLERANCE}: "
          f"{agree}, equal plain within {TOLERANCE}: {close}")
    common.print_table(["task", "requests", "cache hits", "hit rate", "daemon requests",
                        "daemon batches", "p50 ms", "p99 ms", "req/s"], rows,
                       title="Result cache: the same zipf workload without and with the cache")
    return 0 if agree and close else 1


if __name__ == "__main__":
    raise SystemExit(main())

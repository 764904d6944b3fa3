#!/usr/bin/env python3
"""Task-process memory: what each standard task process costs, and how total memory grows per task.

Starts a real fmplexd on the embedded all-MiniLM-L6-v2, deploys N standard tasks through its control
socket (its supervisor spawns them) -- a mix of text-classification tasks (LoRA r=8 on query/value of
every layer + a linear head) and text-embedding tasks (the same kind of LoRA) -- sends a few requests
to each, then reads PSS (shared pages split among their users), RSS and USS (private pages) of every
task process and the daemon's PSS (with its task zygote's) from /proc. N grows 1 -> 8 -> 32 on the same daemon (--quick:
1 -> 4); the slope of the total (daemon + tasks) PSS is the memory one more task costs.

    python -m bench.task_memory [--quick] [--exec] [--counts 1,8,32] [--out DIR]   (repo root)

Tasks are forked by the daemon's task zygote (shared pre-imported pages), or with --exec each is
exec'd afresh (task_zygote = false), which is what a task started by hand costs.

Goal: PSS <= 60 MB (10^6 bytes) per task process (a standard task maps no weights and imports no
torch). Prints a markdown table last and writes task_memory.json to --out.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import sys
import time


from bench import common

import numpy as np
from safetensors.numpy import save_file

from ipc import aio
from ipc.messages import Deploy, Info, ListTasks
from fmplex.client import AsyncClient
from testkit.launch import DaemonProcess, pss_bytes, short_tmpdir

MB = 1e6
GOAL_PSS_MB = 60.0
COUNTS, QUICK_COUNTS = (1, 8, 32), (1, 4)
DEPLOY_CONCURRENCY = 4                     # task processes starting at once
REQUESTS_PER_TASK = 3
TEXTS = ["the quick brown fox jumps over the lazy dog", "memory is what a task costs",
         "a second sentence, a little longer than the first one, to embed"]
LABELS = ["negative", "neutral", "positive"]


def smaps_rollup(pid: int) -> dict[str, int]:
    """Bytes per field of /proc/PID/smaps_rollup (Rss, Pss, Private_Clean, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def write_extensions(work: str, hidden: int, layers: int, seed: int = 0) -> tuple[str, str]:
    """A PEFT LoRA adapter directory (r=8 on query/value, every layer) and a linear head file."""
    rng = np.random.default_rng(seed)
    adapter = os.path.join(work, "lora")
    os.makedirs(adapter)
    tensors = {}
    for layer in range(layers):
        for m in ("attention.self.query", "attention.self.value"):
            key = f"base_model.model.encoder.layer.{layer}.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, 0.05, (8, hidden)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.05, (hidden, 8)).astype(np.float32)
    save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"))
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none",
                   "target_modules": ["query", "value"]}, f)
    head = os.path.join(work, "head.safetensors")
    save_file({"weight": rng.normal(0, 0.1, (len(LABELS), hidden)).astype(np.float32),
               "bias": np.zeros(len(LABELS), np.float32)}, head)
    return adapter, head


def write_spec(work: str, i: int, adapter: str, head: str) -> tuple[str, str]:
    """Task i: classification when i is even, embedding when odd; both with the LoRA."""
    name = f"{'cls' if i % 2 == 0 else 'emb'}-{i:03d}"
    if i % 2 == 0:
        body = (f'pipeline = "text-classification"\nlabels = {json.dumps(LABELS)}\n'
                f'[extension]\nadapter = "{adapter}"\nhead = "{head}"\n')
    else:
        body = f'pipeline = "text-embedding"\n[extension]\nadapter = "{adapter}"\n'
    path = os.path.join(work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'name = "{name}"\n{body}')
    return name, path


async def deploy_and_warm(run_dir: str, specs: list[tuple[str, str]]) -> float:
    """Deploy the tasks (a few starting at once), then send each a few requests. Returns seconds
    spent deploying."""
    refs = itertools.count(1 << 32)
    gate = asyncio.Semaphore(DEPLOY_CONCURRENCY)
    async with AsyncClient(run_dir, timeout_s=300) as c:
        async def deploy(path: str):
            async with gate:
                with open(path) as f:
                    return await c.control(Deploy(ref=next(refs), spec=f.read(), spec_path=path),
                                           timeout_s=300)
        t0 = time.perf_counter()
        await asyncio.gather(*(deploy(path) for _, path in specs))
        seconds = time.perf_counter() - t0
        for _ in range(REQUESTS_PER_TASK):
            await asyncio.gather(*(c.infer(name, TEXTS) for name, _ in specs))
    return seconds


def measure(client, daemon: DaemonProcess) -> dict:
    tasks = [t for t in client.control(ListTasks(ref=client.ref())).tasks if t.pid]
    rows = []
    for t in sorted(tasks, key=lambda t: t.name):
        m = smaps_rollup(t.pid)
        rows.append({"name": t.name, "pid": t.pid, "requests": t.requests,
                     "pss": pss_bytes(t.pid), "rss": m.get("Rss", 0),
                     "uss": m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)})
    helpers = common.daemon_helper_pids(daemon.proc.pid, (t.pid for t in tasks))
    daemon_pss = pss_bytes(daemon.proc.pid) + sum(pss_bytes(pid) for pid in helpers)
    pss = np.array([r["pss"] for r in rows], float)
    return {"n": len(rows), "tasks": rows, "daemon_pss": daemon_pss,
            "task_pss_mean": float(pss.mean()), "task_pss_max": float(pss.max()),
            "task_rss_mean": float(np.mean([r["rss"] for r in rows])),
            "task_uss_mean": float(np.mean([r["uss"] for r in rows])),
            "total_pss": float(daemon_pss + pss.sum())}


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--exec", action="store_true",
                    help="task_zygote = false: the supervisor execs each task (no shared pages)")
    ap.add_argument("--counts", default=None,
                    help="comma-separated task counts to grow through (default 1,8,32)")
    args = ap.parse_args()
    out = common.out_dir(args.out, "task_memory")
    counts = QUICK_COUNTS if args.quick else COUNTS
    if args.counts:
        counts = tuple(sorted(int(n) for n in args.counts.split(",")))
    config = "task_zygote = false" if args.exec else ""
    work = short_tmpdir("fmx-mem-")
    daemon = None
    levels = []
    try:
        os.makedirs(daemon_dir := os.path.join(work, "daemon"))
        t0 = time.perf_counter()
        daemon = DaemonProcess("embedded", workdir=daemon_dir, config=config).start()
        print(f"fmplexd ready in {time.perf_counter() - t0:.1f}s (run dir {daemon.run_dir})")
        with daemon.client(timeout_s=120) as c:
            bb = c.control(Info(ref=c.ref())).backbones[0]
            adapter, head = write_extensions(work, bb.hidden, bb.layers)
            deployed = 0
            for n in counts:
                specs = [write_spec(work, i, adapter, head) for i in range(deployed, n)]
                seconds = aio.run(deploy_and_warm(daemon.run_dir, specs))
                deployed = n
                level = measure(c, daemon)
                assert level["n"] == n, f"{level['n']} task processes running, expected {n}"
                assert all(r["requests"] >= REQUESTS_PER_TASK for r in level["tasks"])
                level["deploy_s"] = seconds
                levels.append(level)
                print(f"{n:3d} tasks: deployed {len(specs)} in {seconds:.1f}s; task PSS mean "
                      f"{level['task_pss_mean'] / MB:.1f} MB, max {level['task_pss_max'] / MB:.1f} MB; "
                      f"daemon PSS {level['daemon_pss'] / MB:.0f} MB; total {level['total_pss'] / MB:.0f} MB",
                      flush=True)
        code = daemon.stop()
        if code != 0:
            print(f"fmplexd exited with {code}")
    finally:
        if daemon is not None:
            daemon.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    ns = np.array([lv["n"] for lv in levels], float)
    totals = np.array([lv["total_pss"] for lv in levels], float)
    slope = float(np.polyfit(ns, totals, 1)[0]) if len(levels) > 1 else float("nan")
    worst = max(lv["task_pss_max"] for lv in levels)
    ok = worst <= GOAL_PSS_MB * MB
    common.write_json(out, "task_memory.json", {
        "backbone": "embedded all-MiniLM-L6-v2", "task_zygote": not args.exec,
        "counts": list(counts), "levels": levels,
        "slope_total_pss_per_task": slope, "goal_task_pss_bytes": GOAL_PSS_MB * MB, "pass": ok})
    rows = []
    for i, lv in enumerate(levels):
        step = "" if i == 0 else (lv["total_pss"] - levels[i - 1]["total_pss"]) / \
            (lv["n"] - levels[i - 1]["n"]) / MB
        rows.append([lv["n"], lv["task_pss_mean"] / MB, lv["task_pss_max"] / MB,
                     lv["task_rss_mean"] / MB, lv["task_uss_mean"] / MB, lv["daemon_pss"] / MB,
                     lv["total_pss"] / MB, step, f"<= {GOAL_PSS_MB:.0f}",
                     common.verdict(lv["task_pss_max"] <= GOAL_PSS_MB * MB)])
    print(f"\ntotal PSS grows by {slope / MB:.1f} MB per added task (least squares over N = "
          f"{', '.join(str(int(n)) for n in ns)})")
    common.print_table(["tasks", "task PSS mean MB", "task PSS max MB", "task RSS mean MB",
                        "task USS mean MB", "daemon PSS MB", "total PSS MB", "MB per added task",
                        "goal task PSS MB", "result"], rows,
                       title=f"task process memory (goal: PSS <= {GOAL_PSS_MB:.0f} MB per task): "
                             f"{common.verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

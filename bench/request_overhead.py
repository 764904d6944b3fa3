#!/usr/bin/env python3
"""Per-request overhead of the request path: client -> task process -> fmplexd -> task -> client.

    python -m bench.request_overhead [--quick] [--out DIR] [--requests N]

A real fmplexd (testkit.launch.DaemonProcess; the embedded all-MiniLM-L6-v2, or with --quick a tiny
random checkpoint) and one task process (bench.serve's first task: a LoRA and a classification
head), deployed through the control socket. One client (fmplex.AsyncClient) sends N one-text
requests of about 10 tokens, one at a time, so nothing queues and every millisecond is overhead or
forward. Per request:

    end to end     measured by the client (send -> reply)
    in fmplexd     the daemon's own latency of the task (TaskStats.p50_ms: admission -> result sent)
    forward        the daemon's forward time of the task's requests (TaskStats.device_ms / requests)

so that `end to end - in fmplexd` is what the two extra hops and the task process cost
(ZeroMQ + MessagePack both ways, tokenizing, post-processing), and `in fmplexd - forward` the
daemon's own share (scheduling, packing, delivery; a p50 less a mean, so only indicative). A
dedicated instance (bench/baseline.py: one process, the model in it, the same Infer/InferReply
over ZeroMQ) answers the same requests one at a time for the comparison. Both are driven through
the load driver's interface (bench/servebench: Fmplex, Baselines). Prints a markdown table last
and writes request_overhead.json.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np

from bench import common
from bench.servebench.tasks import TaskBank, TaskDef
from ipc import aio
from testkit.launch import short_tmpdir

TEXT = "the quick brown fox jumps over the lazy dog"       # about 8 word-piece tokens (+2)


async def sequential(system, n: int, after_warm_up=lambda: None) -> tuple[object, list[float]]:
    """Latencies of n one-at-a-time requests to task 0 of a system with the load driver's
    interface (open / infer / close), after 20 on the same connection to warm it (connect, first
    forwards); returns what `after_warm_up()` gave between the two, and the latencies."""
    await system.open(30)
    try:
        for _ in range(20):
            await system.infer(0, TEXT, 30)
        mark = after_warm_up()
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            await system.infer(0, TEXT, 30)
            lat.append(time.perf_counter() - t0)
        return mark, lat
    finally:
        await system.close()


def fmplex_path(task: TaskDef, backbone: str, n: int) -> dict:
    """End-to-end latencies of n sequential requests, and the daemon's view of them."""
    from bench.servebench.fmplex_system import Fmplex
    fm = Fmplex(None, backbones=backbone)
    try:
        fm.start()
        aio.run(fm.deploy([task]))
        before, lat = aio.run(sequential(fm, n, lambda: fm.daemon.tasks()[task.name]))
        after = fm.daemon.tasks()[task.name]
    finally:
        fm.stop()
    served = after.requests - before.requests
    return {"end_to_end_ms": _summary(lat), "requests": n, "daemon_counted": served,
            "in_fmplexd_p50_ms": after.p50_ms,
            "forward_ms": (after.device_ms - before.device_ms) / max(1, served)}


def dedicated_path(task: TaskDef, backbone: str, n: int) -> dict:
    """The same requests to one dedicated model-instance process (bench/baseline.py, 1 thread)."""
    from bench.servebench.baselines import Baselines
    b = Baselines("dedicated", threads=1, backbone=backbone)
    try:
        b.start([task])
        _, lat = aio.run(sequential(b, n))
    finally:
        b.stop()
    return {"end_to_end_ms": _summary(lat), "requests": n}


def _summary(lat: list[float]) -> dict:
    a = np.asarray(lat) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean())}


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--requests", type=int, default=None, help="N (default 1000; 100 with --quick)")
    args = ap.parse_args()
    out = common.out_dir(args.out, "request_overhead")
    n = args.requests or (100 if args.quick else 1000)
    work = short_tmpdir("fmx-rq-")
    try:
        if args.quick:
            from testkit.tiny import write_tiny
            backbone, label = write_tiny(os.path.join(work, "tiny")), "tiny bert (testkit.tiny)"
        else:
            from fmplexd.families.embedded import embedded_path
            backbone, label = embedded_path("minilm"), "all-MiniLM-L6-v2 (embedded)"
        task = TaskBank(work, backbone)[0]        # bench.serve's first task: LoRA + head
        print(f"fmplex: {n} sequential requests", file=sys.stderr, flush=True)
        fm = fmplex_path(task, backbone, n)
        print(f"dedicated instance: {n} sequential requests", file=sys.stderr, flush=True)
        ded = dedicated_path(task, backbone, n)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    e2e, in_d, fwd = fm["end_to_end_ms"]["p50"], fm["in_fmplexd_p50_ms"], fm["forward_ms"]
    split = {"outside fmplexd (hops, task process), p50": e2e - in_d,
             "inside fmplexd (admission -> result sent), p50": in_d, "of which forward, mean": fwd}
    common.write_json(out, "request_overhead.json", {
        "backbone": label, "text": TEXT, "fmplex": fm, "dedicated": ded, "split_p50_ms": split,
        "overhead_vs_dedicated_ms": e2e - ded["end_to_end_ms"]["p50"]})
    rows = [["fmplex, end to end", f"{e2e:.2f}", f"{fm['end_to_end_ms']['p99']:.2f}"]]
    rows += [[f"  {k}", f"{v:.2f}", ""] for k, v in split.items()]
    rows.append(["dedicated instance, end to end", f"{ded['end_to_end_ms']['p50']:.2f}",
                 f"{ded['end_to_end_ms']['p99']:.2f}"])
    rows.append(["fmplex - dedicated", f"{e2e - ded['end_to_end_ms']['p50']:.2f}", ""])
    m = common.machine()
    common.print_table(["path (one request at a time)", "p50 ms", "p99 ms"], rows,
                       title=f"request overhead: {label}, {n} requests of ~10 tokens; load "
                             f"{m['loadavg_1m']} on {m['cpus']} cpus")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

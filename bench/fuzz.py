#!/usr/bin/env python3
"""Socket fuzzing as a benchmark: every socket of a real fmplexd (tiny backbone) and of a real task
process gets N malformed/hostile inputs (default 100,000 per socket) while a background client runs
real inferences that must all succeed.

    python -m bench.fuzz [--quick] [--n N] [--seed S] [--out DIR]       (from the repository root)

Sockets: control (ROUTER), task plane (ROUTER), the task's client endpoint (ROUTER), handle plane
(AF_UNIX SOCK_SEQPACKET, with fds). The inputs, the oracle and the checks are those of
testkit/fuzz/sockets.py (`run_campaign`, `check_campaign`; its module doc lists them).
Figures: inputs and inputs/s per socket, errors by code, the daemon's RSS after warm-up and at the
end, fds before/after, the valid traffic's successes. Writes fuzz.json to --out; prints the tables
last (goals marked PASS/FAIL).
"""
from __future__ import annotations

import os
import sys
import shutil
import time

from bench import common


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--n", type=int, default=None, help="inputs per socket (default 100000; "
                    "--quick: 3000)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    n = args.n or (3000 if args.quick else 100_000)
    warmup = max(300, n // 30)
    out_dir = common.out_dir(args.out, "fuzz")

    from testkit.tiny import write_tiny
    from testkit.launch import Daemon, TaskProc, short_tmpdir, write_spec
    from testkit.fuzz.sockets import (EXPECTED_CODES, HEARTBEAT_CONFIG, RSS_BOUND_MB, REAL_TASK,
                                        SOCKETS, Target, check_campaign, run_campaign)

    work = short_tmpdir("fmx-bfz-")
    daemon = task = None
    try:
        backbone = write_tiny(os.path.join(work, "tiny"), "bert")
        daemon = Daemon(backbone, config=HEARTBEAT_CONFIG).start()
        task = TaskProc(write_spec(work, REAL_TASK, 'pipeline = "text-embedding"'),
                        daemon.run_dir).start()
        target = Target(daemon.run_dir, daemon.proc.pid, task.proc.pid,
                        f"ipc://{daemon.run_dir}/tenants/{os.getuid()}/{REAL_TASK}.sock")
        print(f"fuzzing {n} inputs per socket (seed {args.seed}, warm-up {warmup}) ...",
              file=sys.stderr, flush=True)
        t0 = time.monotonic()
        res = run_campaign(target, n_per_socket=n, seed=args.seed, warmup=warmup,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
        res["wall_s"] = time.monotonic() - t0
    finally:
        if task is not None:
            task.stop()
        if daemon is not None:
            daemon.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    try:
        check_campaign(res)
        verdict, why = True, ""
    except AssertionError as e:
        verdict, why = False, str(e)[:2000]
    res["check"] = {"passed": verdict, "why": why}
    common.write_json(out_dir, "fuzz.json", res)

    sock_rows = []
    for name in SOCKETS:
        s = res["sockets"][name]
        top = ", ".join(f"{c} {k}" for c, k in list(s["codes"].items())[:4])
        sock_rows.append([name, s["inputs"], s["connections"], s["seconds"], s["inputs_per_s"],
                          s["fds_sent"], sum(s["codes"].values()), top,
                          s["mismatches"] + s["missing"] + s["unmatched"] + s["bad_replies"]
                          + s["probe_timeouts"]])
    common.print_table(["socket", "inputs", "connections", "s", "inputs/s", "fds sent",
                        "errors back", "top codes", "oracle failures"], sock_rows,
                       title="Per socket")
    codes = sorted(res["codes"].items(), key=lambda kv: -kv[1])
    common.print_table(["error code", "count", "expected"],
                       [[c, k, "yes" if c in EXPECTED_CODES else ""] for c, k in codes],
                       title="Errors by code (all sockets)")
    grew = res["rss_after_mb"] - res["rss_warm_mb"]
    fb, fa = res["fds_before"], res["fds_after"]
    rows = [
        ["inputs per socket", n, f">= {n}", common.verdict(min(
            res["sockets"][s]["inputs"] for s in SOCKETS) >= n)],
        ["oracle failures (all sockets)", sum(res["failures"].values()), "0",
         common.verdict(not any(res["failures"].values()))],
        ["expected codes seen", len(EXPECTED_CODES & set(res["codes"])), len(EXPECTED_CODES),
         common.verdict(EXPECTED_CODES <= set(res["codes"]))],
        ["daemon RSS after warm-up (MB)", res["rss_warm_mb"], "", ""],
        ["daemon RSS at end (MB)", res["rss_after_mb"], "", ""],
        ["daemon RSS growth (MB)", grew, f"< {RSS_BOUND_MB}", common.verdict(grew < RSS_BOUND_MB)],
        ["task RSS warm -> end (MB)", f"{res['task_rss_warm_mb']:.1f} -> "
         f"{res['task_rss_after_mb']:.1f}", "", ""],
        ["daemon fds before -> after", f"{fb['daemon']} -> {fa['daemon']}", "no growth",
         common.verdict(fa["daemon"] <= fb["daemon"])],
        ["task fds before -> after", f"{fb['task']} -> {fa['task']}", "no growth",
         common.verdict(fa["task"] <= fb["task"])],
        ["valid inferences ok", res["traffic_ok"], "> 0", common.verdict(res["traffic_ok"] > 0)],
        ["valid inferences failed", len(res["traffic_failed"]), "0",
         common.verdict(not res["traffic_failed"])],
        ["daemon + task alive, same output", res["daemon_alive"] and res["task_alive"]
         and res["same_output"], "True", common.verdict(res["daemon_alive"] and res["task_alive"]
                                                        and res["same_output"])],
        ["fuzz wall time (s)", res["fuzz_seconds"], "", ""],
    ]
    common.print_table(["metric", "value", "goal", "result"], rows,
                       title=f"Socket fuzz: {n} inputs per socket, seed {args.seed}")
    if why:
        print(f"\ncheck failed: {why}", file=sys.stderr)
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())

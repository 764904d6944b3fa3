#!/usr/bin/env python3
"""Wire benchmarks (the ipc package): codec cost per message, ipc:// round trips between two processes, and the import
of a 100 MB shared-memory region through the handle plane.

    python -m bench.wire [--quick] [--out DIR]        (from the repository root)

Prints a markdown table last (goals marked PASS/FAIL) and writes wire.json with every figure to --out
(default: a fresh temporary directory). The same module runs its own child processes (`python -m bench.wire --child ...`):
an echo peer (ROUTER) for the round trips and an importer for the shared-memory import.
The pieces live in bench/wirebench/ (one job per module; see its __init__).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

from bench import common
from ipc import messages as M
from bench.wirebench import report
from bench.wirebench.children import run_child
from bench.wirebench.codec import bench_codec
from bench.wirebench.plan import FULL, QUICK
from bench.wirebench.region_import import bench_import
from bench.wirebench.roundtrip import bench_round_trips


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--imports", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        role, *rest = args.child
        return run_child(role, rest, args.parent_pid, args.imports)

    plan = QUICK if args.quick else FULL
    out_dir = common.out_dir(args.out, "wire")
    run_dir = tempfile.mkdtemp(prefix="fmplex-b-")      # sockets; short path for ipc://
    t_start, load_start = time.monotonic(), report.loadavg()
    try:
        print(f"codec: {len(M.ALL_MESSAGES)} message classes ...", file=sys.stderr, flush=True)
        codec_rows = bench_codec(plan)
        print("round trips ...", file=sys.stderr, flush=True)
        rt = bench_round_trips(plan, run_dir)
        print("100 MB import ...", file=sys.stderr, flush=True)
        imp = bench_import(plan, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    gl = report.goals(rt, imp)
    results = {"meta": {**report.meta(plan, args.quick), "loadavg_start": load_start,
                        "loadavg_end": report.loadavg()},
               "codec": codec_rows, "round_trip": rt, "import": imp, "goals": gl,
               "elapsed_s": time.monotonic() - t_start}
    print(f"\n## codec, mean per call (median of {plan.codec_repeats} repeats; N per row in "
          f"wire.json)\n")
    common.print_table(report.CODEC_HEADER, report.codec_rows(codec_rows))
    print()
    common.write_json(out_dir, "wire.json", results)
    m = results["meta"]
    print(f"({results['elapsed_s']:.1f} s, {m['cpus']} CPUs, load average "
          f"{m['loadavg_start']:.2f} -> {m['loadavg_end']:.2f}{', --quick' if args.quick else ''})\n")
    print("## summary\n")
    common.print_table(report.SUMMARY_HEADER, report.summary_rows(codec_rows, rt, imp, gl))
    return 0


if __name__ == "__main__":
    sys.exit(main())

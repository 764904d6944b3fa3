"""Shared by the benchmarks in bench/: output directory, JSON and the markdown table printed last. Results are printed and written under --out, never committed as truth: the
command that makes them is what docs/benchmarks.md records.

Usage in a benchmark module (run as `python -m bench.NAME` from the repository root, or through
`fmplex bench NAME`):

    from bench import common
    args = common.parser(__doc__).parse_args()      # --quick, --out
    out = common.out_dir(args.out, "NAME")
    ...
    common.write_json(out, "NAME.json", results)
    common.print_table(["metric", "value", "goal", "result"], rows)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--quick", action="store_true", help="a short run (smoke tests)")
    ap.add_argument("--out", default=None, help="directory for the JSON (and PNG) results")
    return ap


def out_dir(path: str | None, name: str) -> str:
    path = path or tempfile.mkdtemp(prefix=f"fmplex-bench-{name}-")
    os.makedirs(path, exist_ok=True)
    return path


def machine() -> dict:
    """What the figures were measured on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_1m": round(load[0], 2),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(out: str, filename: str, results: dict) -> str:
    path = os.path.join(out, filename)
    with open(path, "w") as f:
        json.dump({"machine": machine(), **results}, f, indent=2, default=float)
    print(f"wrote {path}")
    return path


def daemon_helper_pids(daemon_pid: int, task_pids) -> list[int]:
    """fmplexd's descendants that are not task processes (its task zygote): their memory is the
    daemon's, not a task's."""
    import psutil
    tasks = set(task_pids)
    return [p.pid for p in psutil.Process(daemon_pid).children(recursive=True) if p.pid not in tasks]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(header: list[str], rows: list[list], title: str = "") -> None:
    """A markdown table (printed last by every benchmark)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    if title:
        print(f"\n### {title}\n")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.2f}"
    return str(value)

"""Goals, the two markdown tables (codec per message; the summary printed last) and the run's
metadata."""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time

import msgpack
import numpy as np
import zmq

from bench.wirebench.plan import GOAL_IMPORT_RSS_MB, GOAL_IMPORT_US, GOAL_SMALL_P50_US, Plan

CODEC_HEADER = ["message", "frames", "header B", "tensor B", "encode us", "decode us",
                "enc+dec us", "enc+dec min us"]
SUMMARY_HEADER = ["measurement", "value", "goal", "result"]


def goals(rt: dict, imp: dict) -> list[dict]:
    zc, cp = rt["large_zerocopy"]["p50_us"], rt["large_copied"]["p50_us"]
    return [
        {"goal": f"small ipc round trip p50 <= {GOAL_SMALL_P50_US:g} us",
         "value": rt["small_codec"]["p50_us"],
         "pass": rt["small_codec"]["p50_us"] <= GOAL_SMALL_P50_US},
        {"goal": "1 MiB zero-copy round trip faster than copied (p50)",
         "value": zc, "pass": zc < cp},
        {"goal": f"import of 100 MB <= {GOAL_IMPORT_US:g} us (median)",
         "value": imp["median_us"], "pass": imp["median_us"] <= GOAL_IMPORT_US},
        {"goal": f"RSS growth of the import < {GOAL_IMPORT_RSS_MB:g} MB",
         "value": imp["rss_growth_mb"], "pass": imp["rss_growth_mb"] < GOAL_IMPORT_RSS_MB},
    ]


def codec_rows(rows: list[dict]) -> list[list[str]]:
    return [[r["message"], str(r["frames"]), str(r["header_bytes"]), str(r["tensor_bytes"]),
             f"{r['encode_us']:.2f}", f"{r['decode_us']:.2f}", f"{r['encode_decode_us']:.2f}",
             f"{r['encode_decode_min_us']:.2f}"] for r in rows]


def summary_rows(codec: list[dict], rt: dict, imp: dict, gl: list[dict]) -> list[list[str]]:
    verdict = {g["goal"]: ("PASS" if g["pass"] else "FAIL") for g in gl}
    by_name = {r["message"]: r for r in codec}

    def rtrow(label, key, goal=""):
        r = rt[key]
        v = (f"p50 {r['p50_us']:.1f} / p99 {r['p99_us']:.1f} us "
             f"(parent CPU {r['parent_cpu_us']:.1f})")
        return [label, v, goal, verdict.get(goal, "")]

    def mb(v):
        return "n/a" if v is None else f"{v:.2f} MB"

    g = [x["goal"] for x in gl]
    hb, res = by_name["Heartbeat"], by_name["Result(1 MiB)"]
    return [
        ["codec Heartbeat encode / decode / both",
         f"{hb['encode_us']:.2f} / {hb['decode_us']:.2f} / {hb['encode_decode_us']:.2f} us", "", ""],
        ["codec Result(1 MiB) encode / decode / both",
         f"{res['encode_us']:.2f} / {res['decode_us']:.2f} / {res['encode_decode_us']:.2f} us",
         "", ""],
        rtrow("AF_UNIX socketpair round trip, same bytes, no zmq (floor)", "small_unix"),
        rtrow("ipc:// round trip, small, raw zmq (no codec)", "small_raw"),
        rtrow("ipc:// round trip, small (Heartbeat), codec, sync", "small_codec", g[0]),
        rtrow("ipc:// round trip, small, codec, asyncio+uvloop parent / sync echo",
              "small_aio_parent"),
        rtrow("ipc:// round trip, small, codec, asyncio+uvloop both sides", "small_aio_both"),
        rtrow("ipc:// round trip, 1 MiB Result, zero-copy", "large_zerocopy", g[1]),
        rtrow("ipc:// round trip, 1 MiB Result, copied (naive)", "large_copied"),
        rtrow("ipc:// round trip, 1 MiB Result, ipc.transport.send/recv_sync (DEALER send copies)",
              "large_transport"),
        [f"import 100 MB region (handle plane + mmap + view), median of {imp['imports'] - 1} "
         f"after the first",
         f"{imp['median_us']:.1f} us (first {imp['first_us']:.1f}, min {imp['min_us']:.1f}; "
         f"view read-only: {'yes' if imp['view_readonly'] else 'NO'})", g[2], verdict[g[2]]],
        ["... of which fd request / mmap / numpy view",
         f"{imp['median_request_us']:.1f} / {imp['median_mmap_us']:.1f} / "
         f"{imp['median_view_us']:.1f} us", "", ""],
        ["RSS growth after import", f"{imp['rss_growth_mb']:.2f} MB", g[3], verdict[g[3]]],
        ["PSS growth after import", mb(imp["pss_growth_mb"]), "", ""],
        ["RSS / PSS growth after reading every page (contrast)",
         f"{mb(imp['rss_growth_touched_mb'])} / {mb(imp['pss_growth_touched_mb'])}", "", ""],
    ]


def meta(plan: Plan, quick: bool) -> dict:
    return {"quick": quick, "plan": dataclasses.asdict(plan), "python": sys.version.split()[0],
            "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "numpy": np.__version__, "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version)),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def loadavg() -> float:
    """1-minute load average: other work on the host inflates every latency here (read it with
    the cpu count)."""
    return os.getloadavg()[0]

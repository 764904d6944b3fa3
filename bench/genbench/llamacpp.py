"""llama.cpp as a reference point: node-llama-cpp's prebuilt CPU binary serving the base GGUF,
single-stream and with parallel sequences (bench/genbench/llamacpp/bench.mjs: greedy, exactly
128 tokens per sequence). Runs only where node and the package are installed:

    npm install --prefix bench/genbench/llamacpp --omit=optional --ignore-scripts

(the pinned package.json fetches only the linux-x64 CPU prebuilt, no GPU variants, no build);
otherwise the result says why it was skipped."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp")


def run(paths, plan) -> dict:
    if plan.tiny:
        return {"skipped": "the quick plan has no GGUF"}
    if shutil.which("node") is None:
        return {"skipped": "node is not installed"}
    if not os.path.isdir(os.path.join(HERE, "node_modules", "node-llama-cpp")):
        return {"skipped": "node-llama-cpp is not installed (npm install --prefix "
                           "bench/genbench/llamacpp --omit=optional --ignore-scripts)"}
    out = tempfile.mktemp(suffix=".json")
    try:
        proc = subprocess.run(["node", os.path.join(HERE, "bench.mjs"), "--model", paths[0],
                               "--threads", str(plan.threads), "--json", out],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            return {"skipped": f"bench.mjs failed: {proc.stderr[-500:]}"}
        with open(out) as f:
            data = json.load(f)
    finally:
        if os.path.exists(out):
            os.unlink(out)
    s, rows = data["results"]["single"], []
    rows.append(["single stream", 1, s["median"]["ttft_ms"], s["median"]["decode_tps"],
                 s["median"]["e2e_tps"]])
    for p in data["results"]["parallel"]:
        if not p.get("error"):
            rows.append([f"{p['sequences']} parallel sequences", p["sequences"],
                         p["ttft_ms_median"], p["per_seq_decode_tps_median"], p["agg_out_tps"]])
    return {"header": ["scenario", "sequences", "TTFT ms (median)", "decode tok/s per sequence",
                       "output tok/s"], "rows": rows, "raw": data}

"""Smoke test of the serving benchmark: `python -m bench.serve --quick --out DIR` exits 0, writes
serve.json with every section, the three PNG plots, and prints a markdown table last; the three
systems give the same answers; no process it started is left behind; `fmplex bench serve` reaches
the same script."""
import json
import os
import subprocess
import sys

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"machine", "command", "plan", "tasks", "b1_ms_by_tokens", "saturation_rps", "loads_rps",
        "systems", "placement", "capacity", "goals", "outputs_agree", "workload", "profile",
        "plots", "processes_left"}


def _children_of(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_quick_run(tmp_path):
    before = _children_of(os.getpid())
    proc = subprocess.run([sys.executable, "-m", "bench.serve", "--quick", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    with open(tmp_path / "serve.json") as f:
        data = json.load(f)
    assert KEYS <= set(data), sorted(KEYS - set(data))
    for name in ("fmplex", "co-located", "partitioned"):
        system = data["systems"][name]
        assert len(system["runs"]) == len(data["plan"]["load_fractions"]) * len(data["plan"]["alphas"])
        run = system["runs"][0]
        assert {"throughput_rps", "p50_ms", "p90_ms", "p99_ms", "slo_attainment", "per_task"} <= set(run)
        assert set(run["slo_attainment"]) == {str(s) for s in range(2, 11)}
        assert len(run["per_task"]) == data["plan"]["n_tasks"]
        assert system["memory"]["total_mib"] > 0
        assert data["capacity"][name]["hosted"] > 0
    assert data["outputs_agree"], data["probe_outputs"]
    assert data["systems"]["fmplex"]["runs"][0]["failed"] == 0
    assert {"p99_vs_colocated", "p99_vs_partitioned", "capacity_ratio"} <= set(data["goals"])
    assert data["profile"]["scenarios"]
    for png in ("latency_vs_load.png", "slo_attainment.png", "capacity.png"):
        path = tmp_path / png
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = proc.stdout.rstrip().splitlines()
    table = []
    for line in reversed(lines):
        if not line.strip():
            break
        table.append(line)
    assert len(table) >= 3 and all(t.startswith("|") and t.endswith("|") for t in table), table
    assert data["processes_left"] == []
    assert _children_of(os.getpid()) <= before


def test_fmplex_bench_serve_reaches_the_script():
    proc = subprocess.run([sys.executable, "-m", "fmplex", "bench", "serve", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout and "co-located" in proc.stdout


def test_mixed_family_quick_run(tmp_path):
    """`--workload mixed --quick`: one task per family on one daemon vs one process per task;
    every request answered, latency per family, memory per task, device shares per family near
    the weights for fmplex, a table last, nothing left running."""
    before = _children_of(os.getpid())
    proc = subprocess.run([sys.executable, "-m", "bench.serve", "--workload", "mixed", "--quick",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    with open(tmp_path / "serve-mixed.json") as f:
        data = json.load(f)
    families = {"text", "vision", "series"}
    assert {t["family"] for t in data["tasks"]} == families
    for name in ("fmplex", "per-task"):
        system = data["systems"][name]
        for run in system["runs"]:
            assert set(run["families"]) == families
            assert all(v["failed"] == 0 and v["p99_ms"] > 0 for v in run["families"].values())
        assert system["memory"]["per_task_mib"] > 0
        assert set(system["fairness"]["families"]) == families
    shares = data["systems"]["fmplex"]["fairness"]["families"]
    assert all(0.5 < v["ratio"] < 1.5 for v in shares.values()), shares   # a loose bound: 8 s
    table = [line for line in proc.stdout.rstrip().splitlines()[-5:]]
    assert all(t.startswith("|") and t.endswith("|") for t in table), table
    assert data["processes_left"] == []
    assert _children_of(os.getpid()) <= before

"""Smoke test of the benchmarks: each `python -m bench.NAME --quick --out DIR` exits 0, writes its
JSON with the expected keys (and the machine block), and prints a markdown table last."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BENCHES = {
    "executor": ("executor.json", {"results", "torch_threads", "kinds"}),
    "scheduler": ("scheduler.json", {"form_batch_us", "submit_us", "requests_per_batch", "goal"}),
    "fairness": ("fairness.json", {"runs", "phase_s", "processes_left"}),
    "fairness_policy": ("fairness_policy.json", {"runs", "best_ratio_per_load"}),
    "wire": ("wire.json", {"codec", "round_trip", "import", "goals"}),
    "chaos": ("chaos.json", {"summary", "tasks", "kills"}),
    "fuzz": ("fuzz.json", {"sockets", "check"}),
    "task_memory": ("task_memory.json", {"levels", "pass"}),
    "generate": ("generate.json", {"tasks", "lora_overhead", "fairness", "llamacpp", "goals"}),
    "cluster_chaos": ("cluster_chaos.json", {"summary", "tasks", "rounds"}),
    "cluster_sim": ("cluster_sim.json", {"fleets", "sensitivity", "goals"}),
    "cache": ("cache.json", {"params", "runs", "check"}),
    "request_overhead": ("request_overhead.json", {"fmplex", "dedicated", "split_p50_ms"}),
}


def last_block(stdout: str) -> list[str]:
    """The last run of non-empty lines of the output."""
    block: list[str] = []
    for line in reversed(stdout.rstrip().splitlines()):
        if not line.strip():
            break
        block.append(line)
    return block[::-1]


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_quick_run_writes_json_and_prints_a_table_last(name, tmp_path):
    filename, keys = BENCHES[name]
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(tmp_path / filename) as f:
        data = json.load(f)
    assert keys | {"machine"} <= set(data), sorted(data)
    table = last_block(proc.stdout)
    assert len(table) >= 3, proc.stdout[-2000:]
    assert all(line.startswith("|") and line.rstrip().endswith("|") for line in table), table
    assert set(table[1]) <= set("|-: "), table[1]          # the header separator
    widths = {line.count("|") for line in table}
    assert len(widths) == 1, table                           # every row has the header's columns
    if name == "fairness":                                   # every policy ran both phases
        assert data["processes_left"] == []
        from bench.fairness import POLICIES
        assert [r["policy"] for r in data["runs"]] == [name for name, _ in POLICIES]
        assert all(isinstance(r["clients_in_tenant_cgroups"], bool) for r in data["runs"])
        assert all(set(r["phases"]) == {"A", "B"} for r in data["runs"]), data["runs"]
    if name == "chaos":                                      # the guarantee holds in a short run
        s = data["summary"]
        assert s["kills"] > 0 and s["lost"] == s["hung"] == s["wrong"] == 0 and \
            s["daemon_exit"] == 0, s
    if name == "generate":                                   # every system answered everything
        for t in data["tasks"].values():
            assert set(t["systems"]) == {"fmplex", "static", "co-located"}
            for s in t["systems"].values():
                assert s["saturation"]["failed"] == 0 and s["saturation"]["output_tokens"] > 0
                assert all(ld["failed"] == 0 for ld in s["loads"].values())
    if name == "cluster_chaos":                              # a host killed and replaced
        s = data["summary"]
        assert s["kills"] > 0 and s["lost"] == s["hung"] == s["wrong"] == 0 and \
            s["processes_left"] == 0 and s["replaced_s_max"] is not None, s
    if name == "cluster_sim":                                # every policy placed something
        for fleet in data["fleets"].values():
            assert all(v > 0 for v in fleet["best"].values()), fleet["best"]
    if name == "request_overhead":                           # the daemon saw every request
        assert data["fmplex"]["daemon_counted"] == data["fmplex"]["requests"] > 0, data["fmplex"]
    if name == "cache":                                      # hits skip the daemon, change nothing
        runs, check = data["runs"], data["check"]
        assert check["repeats_within"] and check["equal_to_uncached_within"], check
        assert runs["plain"]["cache_hits"] == 0 and runs["cached"]["cache_hits"] > 0
        assert runs["cached"]["daemon_requests"] + runs["cached"]["cache_hits"] == \
            runs["cached"]["requests"]
    if name == "fuzz":
        assert data["check"]["passed"], data["check"]["why"]

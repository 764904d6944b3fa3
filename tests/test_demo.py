"""`fmplex demo --quick` end to end as a subprocess: trains the adapters and an image head, starts
fmplexd on four embedded backbones (text encoder, decoder LLM, vision, time series), deploys eight
supervised tasks, drives concurrent clients, streams a generated answer, checks obvious inputs
(text, held-out photo crops, a held-out year of CO2, the pirate LoRA changing the answers) and
shuts down cleanly. About 2 min here, so it stays in the regular suite."""
import os
import re
import subprocess
import sys

from testkit.launch import REPO

TASKS = ("sentiment", "topic", "embed", "similarity", "scenes", "co2")
GENERATION = ("assistant", "pirate")


def test_demo_quick_runs_end_to_end():
    out = subprocess.run([sys.executable, "-m", "fmplex", "demo", "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "FMPLEX_RUN_DIR"})
    text = out.stdout
    assert out.returncode == 0, text[-4000:] + out.stderr[-4000:]
    lines = text.splitlines()
    assert lines[-1] == "demo passed"
    assert "fmplexd shut down cleanly (exit 0)" in lines
    for name in TASKS + GENERATION:
        assert f"  deployed {name}: task {name} is serving" in lines
    # The per-task table: a row per task with its request count and latencies.
    head = lines.index(next(line for line in lines if line.startswith("task ") and "p99 ms" in line
                            and "sample input" in line))
    rows = {line.split()[0]: line.split() for line in lines[head + 1:head + 1 + len(TASKS)]}
    assert set(rows) == set(TASKS)
    assert sum(int(r[1]) for r in rows.values()) == 80          # --quick: every request answered
    assert all(float(r[2]) > 0 and float(r[3]) >= float(r[2]) for r in rows.values())
    # The checks on obvious inputs: four for sentiment, all right, none wrong.
    oks = [line for line in lines if line.strip().startswith("[ok] sentiment: ")]
    assert len(oks) == 4 and not any("[WRONG]" in line for line in lines)
    assert "  [ok] similarity: paraphrase" in text
    assert len([line for line in lines if line.startswith("  [ok] scenes: ")]) == 4
    assert any(line.startswith("  [ok] co2: 52 held-out weeks") for line in lines)
    # Generation: a streamed answer in the pirate's voice, both tasks side by side, tokens/s.
    streamed = lines[lines.index("pirate, streamed: 'What is the capital of Italy?'") + 1]
    assert streamed.strip().startswith("Arr")
    assert len([line for line in lines if line.startswith("  [ok] ") and "?'" in line]) == 2
    assert re.search(r"4 concurrent generations of 32 tokens on both tasks: 128 tokens in "
                     r"[\d.]+s = \d+ output tokens/s", text)
    # The daemon's own view lists the eight tasks ready, and the task processes are gone now.
    view = lines[lines.index("daemon's view (fmplex task list):") + 3:][:len(TASKS) + 2]
    assert sorted(line.split()[0] for line in view) == sorted(TASKS + GENERATION)
    assert all(line.split()[1] == "ready" for line in view)
    pids = [int(m) for m in re.findall(r"task process \S+\s+pid\s+(\d+)", text)]
    assert len(pids) == len(TASKS) + 2
    assert not [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):   # gone (also while being read)
        return True

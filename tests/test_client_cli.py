"""The asyncio client (concurrency, timeouts, a task dying mid-call) and the `fmplex` command line
end to end, as subprocesses against a real daemon on the tiny backbone."""
import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from ipc import aio
from ipc.errors import RequestTimeout, TaskUnavailable
from ipc.messages import ListTasks, TaskState
from fmplex.client import AsyncClient
from testkit.faults import fault_env
from testkit.launch import REPO, Daemon, TaskProc, short_tmpdir, write_spec
from testkit.tiny import write_random_head as write_head, write_random_lora as write_lora

HIDDEN = 32
FAULTS = fault_env("hang=HANG,exit=EXIT")
# Liveness generous enough for a loaded 2-core machine (a re-registration bumps the version).
SLACK = "heartbeat_ms = 200\nliveness_ms = 5000"
TEXTS = [f"sentence number {i} about {w}" for i, w in enumerate(
    ["cats", "dogs", "rain", "stocks", "music", "bread", "trains", "chess"])]


@pytest.fixture(scope="module")
def env(tiny_bert):
    d = Daemon(tiny_bert, config=SLACK).start()
    specs = short_tmpdir("fmx-cli-")
    write_head(os.path.join(specs, "head.safetensors"), 2, HIDDEN, seed=4)
    write_lora(os.path.join(specs, "lora"), 4, [0, 1], HIDDEN, seed=6)
    paths = {
        "emb": write_spec(specs, "emb", 'pipeline = "text-embedding"'),
        "cls": write_spec(specs, "cls", 'pipeline = "text-classification"\nlabels = ["no", "yes"]\n'
                                        '[extension]\nhead = "head.safetensors"'),
        "sim": write_spec(specs, "sim", 'pipeline = "sentence-similarity"'),
    }
    procs = []
    try:
        procs = [TaskProc(p, d.run_dir).start() for p in paths.values()]
        yield d, specs
    finally:
        for p in procs:
            p.stop()
        d.cleanup()


@pytest.fixture
def faulty(env):
    """A fresh task process that hangs on "HANG" and exits on "EXIT" (a new name per test)."""
    d, specs = env
    made = []

    def start(name):
        path = write_spec(specs, name, 'pipeline = "text-embedding"')
        made.append(TaskProc(path, d.run_dir, env=FAULTS).start())
        return made[-1]
    yield start
    for p in made:
        if p.proc.poll() is None:
            p.proc.kill()                  # a hung event loop cannot handle SIGTERM
        p.stop()


# ---------------------------------------------------------------- AsyncClient

def test_async_client_many_concurrent_infers(env):
    d, _ = env
    with d.client() as c:
        want = {t: c.infer("emb", [t]).embeddings[0] for t in TEXTS}
        want_cls = {t: [l.label for l in c.infer("cls", [t], top_k=2).labels[0]] for t in TEXTS}

    async def main():
        async with AsyncClient(d.run_dir, timeout_s=60) as c:
            calls = [c.infer("emb", [TEXTS[i % 8]]) for i in range(48)]
            calls += [c.infer("cls", [TEXTS[i % 8]], top_k=2) for i in range(24)]
            calls += [c.infer("sim", [TEXTS[0], TEXTS[1]], pairs=[TEXTS[0], TEXTS[2]])]
            return await asyncio.gather(*calls)
    replies = aio.run(main())
    assert len(replies) == 73
    for i, r in enumerate(replies[:48]):            # every reply went to the call that asked
        assert r.task == "emb" and np.allclose(r.embeddings[0], want[TEXTS[i % 8]], atol=1e-5)
    for i, r in enumerate(replies[48:72]):
        assert r.task == "cls" and [l.label for l in r.labels[0]] == want_cls[TEXTS[i % 8]]
    sim = replies[72].similarity
    assert sim[0] == pytest.approx(1.0, abs=1e-5) and sim[1] < sim[0]


def test_async_client_timeout_is_request_timeout(env, faulty):
    d, _ = env
    faulty("hangs")

    async def main():
        async with AsyncClient(d.run_dir, timeout_s=60) as c:
            ok = await c.infer("hangs", ["fine"])
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(RequestTimeout) as e:
                await c.infer("hangs", ["HANG"], timeout_s=1.0)
            return ok, loop.time() - t0, e.value
    ok, waited, err = aio.run(main())
    assert ok.embeddings.shape == (1, HIDDEN)
    assert 1.0 <= waited < 10 and "1.0s" in err.message


def test_async_client_task_killed_mid_call_fails_fast(env, faulty):
    d, _ = env
    victim = faulty("victim")

    async def main():
        async with AsyncClient(d.run_dir, timeout_s=60) as c:
            await c.infer("victim", ["warm up"])
            loop = asyncio.get_running_loop()
            call = asyncio.ensure_future(c.infer("victim", ["HANG"]))
            # The task is inside the call (its loop hangs): the daemon stops hearing it.
            deadline, refs = loop.time() + 30, itertools.count(1 << 32)   # apart from c's refs

            async def state():
                tasks = (await c.control(ListTasks(ref=next(refs)))).tasks
                return {t.name: t.state for t in tasks}["victim"]
            while await state() is not TaskState.DEAD:
                done, _ = await asyncio.wait({call}, timeout=0.05)
                assert not done and loop.time() < deadline
            victim.proc.send_signal(signal.SIGKILL)
            t0 = loop.time()
            with pytest.raises(TaskUnavailable):
                await call
            return loop.time() - t0
    assert aio.run(main()) < 5.0                   # not the 60 s timeout


def test_async_client_task_exiting_mid_call_fails_fast(env, faulty):
    d, _ = env
    faulty("quitter")

    async def main():
        async with AsyncClient(d.run_dir, timeout_s=60) as c:
            await c.infer("quitter", ["warm up"])
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(TaskUnavailable):
                await c.infer("quitter", ["EXIT"])
            return loop.time() - t0
    assert aio.run(main()) < 5.0


# ---------------------------------------------------------------- the fmplex CLI

def fmplex(run_dir: str, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "fmplex", "--run-dir", run_dir, *args], cwd=REPO,
                         capture_output=True, timeout=timeout_s, text=True)
    return out


def test_cli_infer(env):
    d, _ = env
    out = fmplex(d.run_dir, "infer", "emb", "hello world", "second", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["task"], got["truncated"]) == ("emb", [False, False]) and got["version"] >= 1
    assert np.asarray(got["embeddings"]).shape == (2, HIDDEN)
    assert np.allclose(np.linalg.norm(got["embeddings"], axis=1), 1.0, atol=1e-5)

    out = fmplex(d.run_dir, "infer", "cls", "some text", "--top-k", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert re.fullmatch(r"# cls version \d+", lines[0]), lines
    assert lines[1].startswith("'some text': ") and {"no", "yes"} <= set(lines[1].replace(",", " ").split())

    out = fmplex(d.run_dir, "infer", "sim", "a cat", "--pair", "a cat")
    assert out.returncode == 0 and "'a cat': cosine 1.000" in out.stdout, out

    out = fmplex(d.run_dir, "infer", "emb", "word " * 200)
    assert out.returncode == 0 and "(truncated)" in out.stdout


def test_cli_typed_errors_exit_1(env):
    d, _ = env
    out = fmplex(d.run_dir, "infer", "no-such-task", "x")
    assert out.returncode == 1
    assert out.stderr.strip() == "fmplex: unknown_task: no task named 'no-such-task'"
    out = fmplex(d.run_dir, "infer", "sim", "a", "b", "--pair", "c")
    assert out.returncode == 1 and out.stderr.startswith("fmplex: invalid_input: "), out
    out = fmplex(d.run_dir, "task", "remove", "no-such-task")
    assert out.returncode == 1 and "unknown_task" in out.stderr
    out = fmplex(d.run_dir, "health", "no-such-task")
    assert out.returncode == 1 and out.stdout.strip() == "live=False ready=False unknown task"
    out = fmplex(d.run_dir, "infer")                        # usage error
    assert out.returncode == 2 and "usage:" in out.stderr


def test_cli_task_lifecycle_top_info_health(env):
    d, specs = env
    spec = write_spec(specs, "cli-task", 'pipeline = "text-embedding"')
    updated = os.path.join(specs, "cli-task-v2.toml")      # same task, a LoRA added
    with open(updated, "w") as f:
        f.write('name = "cli-task"\npipeline = "text-embedding"\n[extension]\nadapter = "lora"\n')
    try:
        out = fmplex(d.run_dir, "task", "deploy", spec)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "task cli-task is serving"

        out = fmplex(d.run_dir, "health", "cli-task", "--wait", "10")
        assert out.returncode == 0 and out.stdout.strip() == "live=True ready=True ready", out

        out = fmplex(d.run_dir, "task", "list")
        assert out.returncode == 0, out.stderr
        rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
        assert rows["cli-task"][1] == "ready" and rows["emb"][1] == "ready"
        assert out.stdout.splitlines()[0].split()[:3] == ["task", "state", "ver"]

        before = json.loads(fmplex(d.run_dir, "infer", "cli-task", "x", "--json").stdout)
        out = fmplex(d.run_dir, "task", "update", "cli-task", updated)
        assert out.returncode == 0, out
        assert out.stdout.strip() == f"now serving version {before['version'] + 1}"
        after = json.loads(fmplex(d.run_dir, "infer", "cli-task", "x", "--json").stdout)
        assert after["version"] == before["version"] + 1
        assert not np.allclose(before["embeddings"], after["embeddings"], atol=1e-4)

        out = fmplex(d.run_dir, "top", "--once")
        assert out.returncode == 0, out.stderr
        top = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
        assert top["cli-task"][1:3] == ["ready", str(after["version"])]
        assert int(top["cli-task"][6]) >= 2

        out = fmplex(d.run_dir, "info")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("fmplexd ") and f"run dir {d.run_dir}" in lines[0]
        assert lines[1].startswith("backbone default: text-encoder (bert 2x32) float32, ")
        assert lines[2].endswith(" task(s): " + ", ".join(sorted(rows)))   # the tasks on it
        assert "batches" in lines[3] and "tokens/s" in lines[3]
        assert any(line.split()[:2] == ["region", "backbone:default"] for line in lines)
        assert any(line.split()[:2] == ["region", "slot:cli-task"] for line in lines)

        out = fmplex(d.run_dir, "health")
        assert out.returncode == 0 and out.stdout.startswith("live=True ready=True"), out

        out = fmplex(d.run_dir, "task", "deploy", spec)         # already deployed
        assert out.returncode == 1 and "conflict" in out.stderr, out
    finally:
        out = fmplex(d.run_dir, "task", "remove", "cli-task")
    assert out.returncode == 0 and out.stdout.strip() == "removed cli-task", out
    out = fmplex(d.run_dir, "health", "cli-task")
    assert out.returncode == 1 and out.stdout.strip() == "live=False ready=False unknown task"
    out = fmplex(d.run_dir, "task", "list")
    assert "cli-task" not in out.stdout


def test_cli_deploy_of_a_bad_spec_is_a_typed_error(env):
    d, specs = env
    bad = os.path.join(specs, "bad-deploy.toml")
    with open(bad, "w") as f:
        f.write('pipeline = "text-embedding"\n')
    out = fmplex(d.run_dir, "task", "deploy", bad)
    assert out.returncode == 1
    assert out.stderr.strip() == "fmplex: invalid_input: spec field 'name': missing"


def test_cli_deploys_many_specs_with_a_line_per_task(env):
    d, specs = env
    paths = [write_spec(specs, f"many{i}", 'pipeline = "text-embedding"') for i in range(3)]
    bad = write_spec(specs, "many-bad", 'pipeline = "text-embedding"\nbackbone = "nope"')
    out = fmplex(d.run_dir, "task", "deploy", *paths, bad, "--parallel", "2")
    try:
        assert out.returncode == 1, out                            # one of them failed
        lines = out.stdout.splitlines()
        assert [line.split("]")[0] for line in lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]
        assert sorted(line.split("] ", 1)[1] for line in lines if "serving" in line) == \
            [f"task many{i} is serving" for i in range(3)]
        assert any("many-bad.toml: invalid_input: " in line and "nope" in line for line in lines)
        assert "\x1b[2K" not in out.stderr                         # not a terminal: no redraws
        with d.client() as c:
            ready = {t.name for t in c.control(ListTasks(ref=c.ref())).tasks
                     if t.state.value == "ready"}
        assert {"many0", "many1", "many2"} <= ready
    finally:
        for i in range(3):
            fmplex(d.run_dir, "task", "remove", f"many{i}")

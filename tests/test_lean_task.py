"""Standard task processes and clients are lean: they never import torch (DESIGN.md: "Standard tasks
import no torch, so hundreds fit on a host"). Checked on real serving task processes (their memory
maps) and on fresh interpreters that import every module of the task process and of the
user-facing client package (sys.modules)."""
import os
import subprocess
import sys

import pytest

from testkit.launch import REPO, Daemon, TaskProc, short_tmpdir, write_spec
from testkit.tiny import write_random_head as write_head, write_random_lora as write_lora

HIDDEN = 32
TASK_MODULES = ("tasklets", "tasklets.process", "tasklets.pipelines.text", "tasklets.daemon_link",
                "tasklets.pipelines.vision", "tasklets.pipelines.series", "fmplex.demo.samples",
                "tasklets.endpoint", "tasklets.adapters", "tasklets.zygote", "ipc.spec", "ipc.aio",
                "ipc.zap")
CLIENT_MODULES = ("fmplex", "fmplex.client", "fmplex.cli", "fmplex.render", "fmplex.local_daemon",
                  "fmplex.routing", "fmplex.cluster_cli")


@pytest.fixture(scope="module")
def tasks(tiny_bert):
    d = Daemon(tiny_bert, config="liveness_ms = 5000").start()
    specs = short_tmpdir("fmx-lean-")
    write_head(os.path.join(specs, "head.safetensors"), 3, HIDDEN, seed=1)
    write_lora(os.path.join(specs, "lora"), 4, [0, 1], HIDDEN, seed=2)
    emb = write_spec(specs, "lean-emb", 'pipeline = "text-embedding"\n[extension]\nadapter = "lora"')
    cls = write_spec(specs, "lean-cls", 'pipeline = "text-classification"\nlabels = ["a", "b", "c"]\n'
                                        '[extension]\nadapter = "lora"\nhead = "head.safetensors"')
    procs = []
    try:
        procs = [TaskProc(p, d.run_dir).start() for p in (emb, cls)]
        yield d, {"lean-emb": procs[0], "lean-cls": procs[1]}
    finally:
        for p in procs:
            p.stop()
        d.cleanup()


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {parts[5] for parts in (line.split(maxsplit=5) for line in f) if len(parts) == 6}


def test_serving_task_processes_map_no_torch(tasks):
    d, procs = tasks
    with d.client() as c:                     # serve first: every lazy path has run
        assert c.infer("lean-emb", ["hello", "world"]).embeddings.shape == (2, HIDDEN)
        assert len(c.infer("lean-cls", ["is it lean"], top_k=3).labels[0]) == 3
    daemon_maps = mapped_files(d.proc.pid)
    assert any("libtorch" in p for p in daemon_maps)        # the check can see torch at all
    for name, p in procs.items():
        files = mapped_files(p.proc.pid)
        torch_files = sorted(f for f in files if "libtorch" in f or "/torch/" in f)
        assert not torch_files, (name, torch_files[:5])
        assert any("tokenizers" in f for f in files)          # it did load its native parts


@pytest.mark.parametrize("modules", [TASK_MODULES, CLIENT_MODULES], ids=["task", "client"])
def test_task_and_client_modules_do_not_import_torch(modules):
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print('torch' in sys.modules, sorted(k for k in sys.modules if k.startswith('torch'))[:5])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "False []"


def _tree_pss(pid: int) -> int:
    """PSS of a process and all its descendants (the daemon, its zygote and the tasks)."""
    import psutil
    from testkit.launch import pss_bytes
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    return sum(pss_bytes(p.pid) for p in procs)


def test_a_generation_task_imports_no_torch_and_adds_at_most_20_mb(tiny_llama):
    """Generation task processes (forked by the zygote, as deployed) map no torch; the memory of
    the whole tree (daemon + zygote + tasks) grows by at most 20 MB per task from 2 to 5 tasks,
    each having served a chat request (tokenizer, chat template and stream paths all used)."""
    from ipc.messages import Deploy
    d = Daemon({"llama": tiny_llama}, config="liveness_ms = 5000\nkv_pool_mb = 4").start()
    specs = short_tmpdir("fmx-leangen-")
    try:
        def deploy(names):
            with d.client() as c:
                for name in names:
                    path = write_spec(specs, name, 'pipeline = "text-generation"\n'
                                                   'backbone = "llama"')
                    with open(path) as f:
                        c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)
                for name in names:
                    r = c.generate(name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
                    assert r.completion_tokens == 4
                    assert len(list(c.stream(name, prompt="hello", max_tokens=3))) >= 2
        deploy(["g0", "g1"])
        two = _tree_pss(d.proc.pid)
        deploy(["g2", "g3", "g4"])
        five = _tree_pss(d.proc.pid)
        per_task = (five - two) / 3
        print(f"tree PSS {two / 2**20:.1f} MiB with 2 tasks, {five / 2**20:.1f} MiB with 5: "
              f"{per_task / 1e6:.1f} MB per generation task")
        assert per_task <= 20e6, per_task
        with d.client() as c:
            from ipc.messages import ListTasks
            pids = [t.pid for t in c.control(ListTasks(ref=c.ref())).tasks]
        for pid in pids:
            files = mapped_files(pid)
            assert not [f for f in files if "libtorch" in f or "/torch/" in f]
    finally:
        d.cleanup()

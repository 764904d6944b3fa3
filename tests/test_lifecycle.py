"""Live lifecycle with real processes: deploy, update (same and new layout), failed update, remove,
canary split / promote / rollback, all while other traffic flows, never restarting the daemon."""
import os

import pytest

from ipc.errors import FmplexError, ErrorCode
from ipc.messages import Deploy, Health, ListTasks, Op, RemoveTask, TaskCommand
from testkit.launch import Daemon, Traffic, short_tmpdir, write_spec
from testkit.tiny import write_random_head as write_head, write_random_lora as write_lora

HIDDEN = 32


@pytest.fixture(scope="module")
def env(tiny_bert):
    d = Daemon(tiny_bert).start()
    specs = short_tmpdir("fmx-life-")
    for i in range(3):
        write_head(os.path.join(specs, f"head{i}.safetensors"), 2, HIDDEN, seed=i)
    write_head(os.path.join(specs, "bad.safetensors"), 2, HIDDEN * 2, seed=9)
    write_lora(os.path.join(specs, "lora"), 4, [0, 1], HIDDEN, seed=5)
    yield d, specs
    d.cleanup()


def spec_text(head: str, adapter: str = "") -> str:
    ext = f'[extension]\nhead = "{head}"\n' + (f'adapter = "{adapter}"\n' if adapter else "")
    return f'name = "cls"\npipeline = "text-classification"\nlabels = ["a", "b"]\n{ext}'


def deploy(c, specs, name, body):
    path = write_spec(specs, name, body)
    with open(path) as f:
        return c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)


def command(c, specs, op, text="", canary=0):
    return c.control(TaskCommand(ref=c.ref(), name="cls", op=op, spec=text, spec_dir=specs,
                                 canary_percent=canary), timeout_s=60)


def scores(c, text="some input text"):
    r = c.infer("cls", [text], top_k=2)
    return r.task, r.version, {l.label: l.score for l in r.labels[0]}


def same(a: dict, b: dict) -> bool:
    """Scores equal up to float noise (batch composition changes the summation order)."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def tasks(c):
    return {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}


def test_live_updates_and_removal_under_traffic(env):
    d, specs = env
    with d.client() as c:
        deploy(c, specs, "cls", spec_text("head0.safetensors").split("\n", 1)[1])
        deploy(c, specs, "emb", 'pipeline = "text-embedding"')
        _, v1, s1 = scores(c)
        with Traffic(d.run_dir, ["cls", "emb"]) as traffic:
            assert "version 2" in command(c, specs, Op.UPDATE, spec_text("head1.safetensors")).message
            _, v2, s2 = scores(c)
            assert v2 == v1 + 1 and not same(s2, s1)
            # A new layout (LoRA added): a new slot generation, still no failed request.
            command(c, specs, Op.UPDATE, spec_text("head1.safetensors", "lora"))
            _, v3, s3 = scores(c)
            assert v3 == v2 + 1 and not same(s3, s2)
            # A failed update says why and keeps the old version serving.
            with pytest.raises(FmplexError) as e:
                command(c, specs, Op.UPDATE, spec_text("bad.safetensors"))
            assert e.value.code is ErrorCode.INVALID_EXTENSION
            assert "head.weight" in e.value.message and "(2, 64)" in e.value.message
            name, v, s = scores(c)
            assert (name, v) == ("cls", v3) and same(s, s3)
            # Deploy and remove a third task while the others serve.
            deploy(c, specs, "extra", 'pipeline = "text-embedding"')
            pid = tasks(c)["extra"].pid
            assert c.infer("extra", ["x"]).embeddings.shape == (1, HIDDEN)
            c.control(RemoveTask(ref=c.ref(), name="extra"))
            assert "extra" not in tasks(c)
        assert not traffic.failed["cls"] and not traffic.failed["emb"], traffic.failed
        versions = [r.version for r in traffic.ok["cls"]]
        assert len(versions) > 3 and versions == sorted(versions)      # never goes back
        assert not c.control(Health(ref=c.ref(), name="extra")).live
    assert _reaped(pid)


def _reaped(pid: int) -> bool:
    """The removed task's process exits (it is the daemon's child, which reaps it)."""
    import time
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):   # gone (also while being read)
            return True
        os.sched_yield()
    return False


def test_canary_split_promote_and_rollback(env):
    d, specs = env
    with d.client() as c:
        if "cls" not in tasks(c):
            deploy(c, specs, "cls", spec_text("head0.safetensors").split("\n", 1)[1])
        command(c, specs, Op.UPDATE, spec_text("head0.safetensors"))
        _, main_v, main_s = scores(c)
        msg = command(c, specs, Op.UPDATE, spec_text("head2.safetensors"), canary=50).message
        assert "50%" in msg
        seen = [scores(c) for _ in range(120)]
        by = {name: [s for n, _, s in seen if n == name] for name in ("cls", "cls@canary")}
        assert 25 <= len(by["cls@canary"]) <= 95, len(by["cls@canary"])
        assert all(same(s, main_s) for s in by["cls"])
        canary_s = by["cls@canary"][0]
        assert not same(canary_s, main_s)
        stats = tasks(c)
        assert stats["cls@canary"].requests >= len(by["cls@canary"])     # stats shown apart
        assert stats["cls"].requests >= len(by["cls"])
        command(c, specs, Op.ROLLBACK)
        assert {scores(c)[0] for _ in range(20)} == {"cls"} and "cls@canary" not in tasks(c)
        command(c, specs, Op.UPDATE, spec_text("head2.safetensors"), canary=30)
        command(c, specs, Op.PROMOTE)
        name, v, s = scores(c)
        assert name == "cls" and v > main_v and same(s, canary_s)
        assert "cls@canary" not in tasks(c)

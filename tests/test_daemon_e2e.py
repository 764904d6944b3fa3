"""A real fmplexd with real task processes on the task plane, the control API, and bad input."""
import asyncio
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from ipc import aio
from ipc.errors import ErrorCode, FmplexError, InvalidRequest, UnknownTask
from ipc.messages import (PROTOCOL_VERSION, ExtensionSpec, Health, Info, LoraEntry, ListTasks, Output,
                          Register, RemoveTask, TaskConfig, TaskState)
from tasklets.daemon_link import DaemonLink
from ipc.addresses import RunDir
from testkit.launch import Daemon, TaskProc, short_tmpdir, write_spec


@pytest.fixture(scope="module")
def daemon(tiny_bert):
    d = Daemon(tiny_bert, config="heartbeat_ms = 100\nliveness_ms = 800").start()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def specs():
    d = short_tmpdir("fmx-spec-")
    rng = np.random.default_rng(0)
    save_file({"weight": rng.normal(0, 1, (2, 32)).astype(np.float32),
               "bias": np.zeros(2, np.float32)}, os.path.join(d, "head.safetensors"))
    save_file({"weight": rng.normal(0, 1, (2, 64)).astype(np.float32),
               "bias": np.zeros(2, np.float32)}, os.path.join(d, "bad_head.safetensors"))
    return d


@pytest.fixture(scope="module")
def two_tasks(daemon, specs):
    emb = write_spec(specs, "emb", 'pipeline = "text-embedding"')
    cls = write_spec(specs, "cls", 'pipeline = "text-classification"\nlabels = ["no", "yes"]\n'
                                   '[extension]\nhead = "head.safetensors"')
    procs = [TaskProc(p, daemon.run_dir).start() for p in (emb, cls)]
    yield procs
    for p in procs:
        p.stop()


def test_two_task_processes_serve_over_the_task_plane(daemon, two_tasks):
    with daemon.client() as c:
        emb = c.infer("emb", ["hello world", "a second, longer sentence to embed"])
        cls = c.infer("cls", ["is this positive"], top_k=2)
        assert emb.embeddings.shape == (2, 32)
        assert np.allclose(np.linalg.norm(emb.embeddings, axis=1), 1.0, atol=1e-5)
        assert {l.label for l in cls.labels[0]} == {"no", "yes"}
        assert cls.labels[0][0].score >= cls.labels[0][1].score
        assert abs(sum(l.score for l in cls.labels[0]) - 1.0) < 1e-5
        replies = c.infer_many("emb", [["one"], ["two"], ["three"]])
        assert [r.embeddings.shape for r in replies] == [(1, 32)] * 3
        tasks = {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}
    assert tasks["emb"].state is TaskState.READY and tasks["cls"].state is TaskState.READY
    assert tasks["emb"].requests >= 4 and tasks["cls"].requests >= 1
    assert tasks["emb"].served_tokens > 0 and tasks["emb"].p99_ms > 0
    assert tasks["emb"].pid == two_tasks[0].proc.pid


def test_info_and_health(daemon, two_tasks):
    with daemon.client() as c:
        info = c.control(Info(ref=c.ref()))
        kinds = {r.name: r.kind for r in info.regions}
        assert kinds["backbone:default"] == "backbone"
        assert kinds["slot:emb"] == "slot" and kinds["slot:cls"] == "slot"
        assert info.backbones[0].hidden == 32 and len(info.backbones[0].checksum) == 32
        assert c.control(Health(ref=c.ref())).ready
        assert c.control(Health(ref=c.ref(), name="emb")).ready
        assert not c.control(Health(ref=c.ref(), name="nope")).live


def test_control_register_and_remove(daemon):
    cfg = TaskConfig(name="ctl-registered", owner_uid=os.getuid())
    ext = ExtensionSpec(lora=[LoraEntry(layer=0, module="query", rank=4, scale=2.0)])
    with daemon.client() as c:
        reg = c.control(Register(ref=c.ref(), proto=PROTOCOL_VERSION, task=cfg, extension=ext))
        assert reg.slot.entries[0].name == "lora.0.query.A" and reg.slot.entries[0].shape == [4, 32]
        names = {t.name: t.state for t in c.control(ListTasks(ref=c.ref())).tasks}
        assert names["ctl-registered"] is TaskState.WAITING
        c.control(RemoveTask(ref=c.ref(), name="ctl-registered"))
        assert "ctl-registered" not in {t.name for t in c.control(ListTasks(ref=c.ref())).tasks}


def test_unknown_task_is_a_typed_error(daemon):
    with daemon.client() as c, pytest.raises(UnknownTask):
        c.infer("no-such-task", ["x"])


def test_extension_with_wrong_shapes_names_tensor_and_both_shapes(daemon, specs):
    bad = write_spec(specs, "badshape", 'pipeline = "text-classification"\nlabels = ["a", "b"]\n'
                                        '[extension]\nhead = "bad_head.safetensors"')
    with pytest.raises(RuntimeError) as e:
        TaskProc(bad, daemon.run_dir).start(timeout_s=60)
    text = str(e.value)
    assert "invalid_extension" in text and "head.weight" in text
    assert "(2, 64)" in text and "(2, 32)" in text


async def _with_link(run_dir, fn):
    link = DaemonLink(RunDir(run_dir))
    await link.open(10)
    try:
        return await fn(link)
    finally:
        await link.close()


def register_raw(daemon, name, ext):
    cfg = TaskConfig(name=name, owner_uid=os.getuid())

    async def go(link):
        return await link.register(cfg, ext, {})
    return aio.run(_with_link(daemon.run_dir, go))


def test_layer_the_backbone_lacks_is_refused(daemon):
    ext = ExtensionSpec(lora=[LoraEntry(layer=7, module="value", rank=2, scale=1.0)])
    with pytest.raises(FmplexError) as e:
        register_raw(daemon, "too-deep", ext)
    assert e.value.code is ErrorCode.INVALID_EXTENSION and "2 layers" in e.value.message


def test_rank_larger_than_the_layer_is_refused(daemon):
    ext = ExtensionSpec(lora=[LoraEntry(layer=0, module="key", rank=64, scale=1.0)])
    with pytest.raises(FmplexError) as e:
        register_raw(daemon, "too-wide", ext)
    assert e.value.code is ErrorCode.INVALID_EXTENSION and "rank 64" in e.value.message


def test_bad_submits_get_typed_errors_and_disturb_nothing(daemon, two_tasks):
    cfg = TaskConfig(name="raw", owner_uid=os.getuid(), deadline_ms=60_000)

    async def go(link):
        s = await link.register(cfg, ExtensionSpec(), {})

        async def submit(ids, lengths, output=Output.POOLED, deadline_ms=0):
            try:
                return await link.submit(s, output, np.asarray(ids, np.int32), lengths, deadline_ms)
            except FmplexError as e:
                return e
        ok = await submit([101, 2000, 102], [3])
        errs = {
            "oversized": await submit(np.full(100, 5), [100]),            # tiny backbone: 64 positions
            "bad_id": await submit([101, 999_999, 102], [3]),
            "lengths": await submit([101, 102], [3]),
            "no_head": await submit([101, 102], [2], Output.LOGITS),
        }
        # A deadline that passes while the executor is busy: queued behind full batches.
        big = [submit(np.full(60, 7), [60] * 1, deadline_ms=60_000) for _ in range(200)]
        late = [submit([101, 102], [2], deadline_ms=1) for _ in range(20)]
        results = await asyncio.gather(*big, *late)
        after = await submit([101, 2000, 102], [3])
        return ok, errs, results[len(big):], after
    ok, errs, late, after = aio.run(_with_link(daemon.run_dir, go))
    assert ok.data.shape == (1, 32)
    assert errs["oversized"].code is ErrorCode.OVERSIZED and "64 positions" in errs["oversized"].message
    assert errs["bad_id"].code is ErrorCode.INVALID_INPUT
    assert errs["lengths"].code is ErrorCode.INVALID_INPUT
    assert errs["no_head"].code is ErrorCode.INVALID_INPUT and "head" in errs["no_head"].message
    timeouts = [r for r in late if isinstance(r, FmplexError)]
    assert timeouts and all(r.code is ErrorCode.TIMEOUT for r in timeouts)
    assert after.data.shape == (1, 32)
    with daemon.client() as c:                 # the other tasks still serve
        assert c.infer("emb", ["still fine"]).embeddings.shape == (1, 32)


def test_stale_epoch_is_refused(daemon):
    async def go(link):
        s = await link.register(TaskConfig(name="stale", owner_uid=os.getuid()), ExtensionSpec(), {})
        await link.unregister(s)
        link.sessions[s.epoch] = s                       # pretend we did not notice
        try:
            await link.submit(s, Output.POOLED, np.asarray([101, 102], np.int32), [2], 1000)
        except FmplexError as e:
            return e
    err = aio.run(_with_link(daemon.run_dir, go))
    assert err.code is ErrorCode.STALE_EPOCH


def test_invalid_input_from_a_client_is_typed(daemon, two_tasks):
    with daemon.client() as c, pytest.raises(InvalidRequest):
        c.infer("emb", ["a"], pairs=["b"])


def test_one_daemon_hosts_two_backbones_and_serves_tasks_of_both(tiny_bert, tiny_roberta, specs):
    """Two backbones (BERT and RoBERTa, 32 wide) in one daemon, each in its own region, each task
    on the backbone its spec names; Info lists both regions and the targets of each."""
    d = Daemon({"bert": tiny_bert, "roberta": tiny_roberta}).start()
    procs = []
    try:
        paths = {b: write_spec(specs, f"on-{b}", f'pipeline = "text-embedding"\nbackbone = "{b}"')
                 for b in ("bert", "roberta")}
        procs = [TaskProc(p, d.run_dir).start() for p in paths.values()]
        with d.client() as c:
            a = c.infer("on-bert", ["the same words"]).embeddings
            b = c.infer("on-roberta", ["the same words"]).embeddings
            info = c.control(Info(ref=c.ref()))
        assert a.shape == b.shape == (1, 32) and not np.allclose(a, b, atol=1e-3)
        assert {bb.name: bb.model_type for bb in info.backbones} == {"bert": "bert",
                                                                      "roberta": "roberta"}
        assert all(bb.family.value == "text-encoder" and len(bb.targets) == 6
                   for bb in info.backbones)
        assert sorted(r.name for r in info.regions if r.kind == "backbone") == [
            "backbone:bert", "backbone:roberta"]
    finally:
        for p in procs:
            p.stop()
        d.cleanup()

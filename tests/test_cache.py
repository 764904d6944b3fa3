"""The per-task result cache (tasklets/cache.py): its keys, bound and eviction alone, then real task
processes on a real daemon (tiny BERT + tiny Llama): a hit is the miss's reply and never reaches
the daemon, parameters and versions key apart, update / canary / promote / rollback empty it, only
deterministic generations are kept, errors never are, and the hits reach the daemon's task stats."""
import dataclasses
import os
import time

import numpy as np
import pytest

from ipc.errors import FmplexError
from ipc.messages import (FinishReason, GenerateReply, GenerateText, Infer, InferReply,
                          InferSeries, LabelScore, ListTasks, Op, TaskCommand, TextDelta)
from tasklets.cache import OVERHEAD, ResultCache, replay
from testkit.launch import Daemon, TaskProc, short_tmpdir, write_spec
from testkit.tiny import write_random_head, write_random_lora

HIDDEN = 32
WAIT_S = 30


# ------------------------------------------------------------------ the cache alone

def emb_reply(ref: int, n: int, version: int = 1) -> InferReply:
    return InferReply(ref=ref, task="t", version=version, truncated=[False] * n,
                      embeddings=np.arange(n * 8, dtype=np.float32).reshape(n, 8))


def test_keys_cover_input_parameters_version_and_variant_but_not_ref_or_timeout():
    k = ResultCache.key
    base = Infer(ref=1, texts=["a", "b"], top_k=2, timeout_ms=100, proto=2)
    same = Infer(ref=99, texts=["a", "b"], top_k=2, timeout_ms=5000)
    assert k("t", 1, "text-classification", base) == k("t", 1, "text-classification", same)
    others = [k("t", 1, "text-classification", Infer(ref=1, texts=["a", "c"], top_k=2)),
              k("t", 1, "text-classification", Infer(ref=1, texts=["a", "b"], top_k=3)),
              k("t", 1, "text-classification", Infer(ref=1, texts=["a", "b"], pairs=["x", "y"],
                                                     top_k=2)),
              k("t", 2, "text-classification", base), k("t@canary", 1, "text-classification", base),
              k("t", 1, "text-embedding", base)]
    assert len({k("t", 1, "text-classification", base), *others}) == 7
    series = np.array([[1.0, 2.0, np.nan]], np.float32)
    assert k("s", 1, "f", InferSeries(ref=1, values=series, horizon=4)) == \
        k("s", 1, "f", InferSeries(ref=2, values=series.copy(), horizon=4, timeout_ms=9))
    assert k("s", 1, "f", InferSeries(ref=1, values=series, horizon=4)) != \
        k("s", 1, "f", InferSeries(ref=1, values=series, horizon=5))


def test_only_deterministic_generations_have_keys():
    k = ResultCache.key
    greedy = GenerateText(ref=1, prompt="hi", temperature=0.0, stream=True)
    assert k("g", 1, "text-generation", greedy) == \
        k("g", 1, "text-generation", GenerateText(ref=7, prompt="hi", temperature=0.0))
    assert k("g", 1, "text-generation", GenerateText(ref=1, prompt="hi", temperature=0.8)) is None
    seeded = k("g", 1, "text-generation", GenerateText(ref=1, prompt="hi", temperature=0.8, seed=3))
    assert seeded is not None and seeded != k("g", 1, "text-generation", GenerateText(
        ref=1, prompt="hi", temperature=0.8, seed=4))
    unset = GenerateText(ref=1, prompt="hi")             # the task's default decides
    assert k("g", 1, "text-generation", unset, greedy_default=True) is not None
    assert k("g", 1, "text-generation", unset, greedy_default=False) is None


def test_a_hit_is_the_miss_reply_with_the_new_ref_and_read_only_arrays():
    cache = ResultCache(1 << 20)
    miss = emb_reply(ref=5, n=3)
    assert cache.get(b"k", "t", 5) is None and cache.put(b"k", "t", miss)
    hit = cache.get(b"k", "t", 6)
    assert hit.ref == 6 and hit.embeddings is miss.embeddings and hit.version == miss.version
    assert hit == dataclasses.replace(miss, ref=6)
    with pytest.raises(ValueError):
        hit.embeddings[0, 0] = 1.0                       # stored arrays are frozen
    c = cache.counts["t"]
    assert (c.hits, c.misses, c.entries) == (1, 1, 1) and c.bytes == cache.bytes > OVERHEAD


def test_the_bound_evicts_least_recently_used_and_refuses_large_replies():
    one = OVERHEAD + 300                   # about one 8-row embedding reply (256 B of floats)
    cache = ResultCache(10 * one)
    for i in range(6):
        assert cache.put(bytes([i]), "t", emb_reply(ref=i, n=8))
    per = cache.bytes // 6
    assert cache.get(bytes([0]), "t", 0) is not None               # 0 is now the most recent
    for i in range(6, 12):
        cache.put(bytes([i]), "t", emb_reply(ref=i, n=8))
    assert cache.bytes <= cache.capacity and len(cache) == cache.capacity // per
    kept = {i for i in range(12) if bytes([i]) in cache._entries}
    assert 0 in kept and 1 not in kept and 11 in kept                # LRU, not FIFO
    assert not cache.put(b"big", "t", emb_reply(ref=1, n=64))       # > capacity / 8
    assert cache.counts["t"].entries == len(cache)
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 and cache.counts["t"].bytes == 0


def test_unfinished_generations_are_not_kept_and_a_streamed_hit_replays_its_text():
    cache = ResultCache(1 << 20)
    reply = GenerateReply(ref=1, task="g", version=1, text="Paris.", token_ids=[5, 6, 2],
                          prompt_tokens=4, completion_tokens=3, finish_reason=FinishReason.STOP)
    assert not cache.put(b"c", "g", GenerateReply(**_fields(reply,
                                                           finish_reason=FinishReason.CANCELLED)))
    assert cache.put(b"s", "g", reply)
    sent = []
    replay(reply, GenerateText(ref=9, prompt="x", stream=True), sent.append)
    replay(reply, GenerateText(ref=9, prompt="x"), sent.append)
    assert sent == [TextDelta(ref=9, text="Paris.", token_ids=[5, 6, 2])]
    replay(InferReply(ref=1, task="t", version=1, truncated=[],
                      labels=[[LabelScore("a", 1.0)]]), Infer(ref=1, texts=["x"]), sent.append)
    assert len(sent) == 1


def _fields(msg, **changes):
    return {**{f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}, **changes}


# ------------------------------------------------------------------ real task processes

GEN = 'pipeline = "text-generation"\nbackbone = "llama"\ncache_mb = 4\n'


@pytest.fixture(scope="module")
def env(tiny_bert, tiny_llama):
    d = Daemon({"default": tiny_bert, "llama": tiny_llama},
               config="liveness_ms = 5000\nkv_pool_mb = 4").start()
    specs = short_tmpdir("fmx-cache-")
    write_random_lora(os.path.join(specs, "lora1"), 4, [0, 1], HIDDEN, seed=1)
    write_random_lora(os.path.join(specs, "lora2"), 4, [0, 1], HIDDEN, seed=2)
    write_random_head(os.path.join(specs, "head.safetensors"), 3, HIDDEN, seed=3)
    bodies = {
        "emb": 'pipeline = "text-embedding"\ncache_mb = 1\n[extension]\nadapter = "lora1"',
        "emb-plain": 'pipeline = "text-embedding"\n[extension]\nadapter = "lora1"',
        "cls": 'pipeline = "text-classification"\nlabels = ["a", "b", "c"]\ncache_mb = 1\n'
               '[extension]\nhead = "head.safetensors"',
        "gen": GEN + "[generation]\nmax_tokens = 8"}
    procs = []
    try:
        for name, body in bodies.items():
            procs.append(TaskProc(write_spec(specs, name, body), d.run_dir).start())
        yield d, specs
    finally:
        for p in procs:
            p.stop()
        d.cleanup()


def stats(c) -> dict:
    return {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}


def wait_for(cond, timeout_s: float = WAIT_S):
    """Poll a daemon-side condition (reports arrive once per heartbeat period), bounded."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_hit_is_the_miss_reply_and_never_reaches_the_daemon(env):
    d, _ = env
    texts = ["the cache keeps this", "and this one"]
    with d.client() as c:
        before = stats(c)["emb"].requests
        miss = c.infer("emb", texts)
        hits = [c.infer("emb", texts) for _ in range(3)]
        after = stats(c)["emb"]
        assert after.requests == before + 1                    # only the miss ran
        for h in hits:
            assert (h.task, h.version, h.truncated, h.prompt_tokens) == \
                (miss.task, miss.version, miss.truncated, miss.prompt_tokens)
            assert h.embeddings.dtype == np.float32 and np.array_equal(h.embeddings, miss.embeddings)
        plain = c.infer("emb-plain", texts)                     # the same model, no cache
        assert np.allclose(plain.embeddings, miss.embeddings, atol=1e-5)
        other = c.infer("emb", texts[:1])                       # another input: a miss
        assert stats(c)["emb"].requests == before + 2
        assert np.allclose(other.embeddings[0], miss.embeddings[0], atol=1e-5)
        wait_for(lambda: (stats(c)["emb"].cache_hits, stats(c)["emb"].cache_misses) == (3, 2))
        assert stats(c)["emb"].cache_bytes > 0 and stats(c)["emb-plain"].cache_hits == 0


def test_parameters_key_apart_and_errors_are_not_cached(env):
    d, _ = env
    with d.client() as c:
        n0 = stats(c)["cls"].requests
        top1 = c.infer("cls", ["which label"], top_k=1)
        top3 = c.infer("cls", ["which label"], top_k=3)
        assert len(top1.labels[0]) == 1 and len(top3.labels[0]) == 3
        assert c.infer("cls", ["which label"], top_k=3).labels == top3.labels
        assert stats(c)["cls"].requests == n0 + 2
        for _ in range(2):                                      # refused both times, by the task
            with pytest.raises(FmplexError, match="takes no pairs"):
                c.infer("cls", ["x"], pairs=["y"])


def test_update_canary_promote_and_rollback_empty_it(env):
    d, specs = env
    text = ["what the version says"]

    def command(c, op, adapter="", canary=0):
        body = ""
        if adapter:
            body = ('name = "emb"\npipeline = "text-embedding"\ncache_mb = 1\n'
                    f'[extension]\nadapter = "{adapter}"')
        return c.control(TaskCommand(ref=c.ref(), name="emb", op=op, spec=body, spec_dir=specs,
                                     canary_percent=canary), timeout_s=60)

    with d.client() as c:
        v1 = c.infer("emb", text)
        n = stats(c)["emb"].requests
        assert np.array_equal(c.infer("emb", text).embeddings, v1.embeddings)   # a hit
        command(c, Op.UPDATE, "lora2")
        v2 = c.infer("emb", text)
        assert v2.version == v1.version + 1 and stats(c)["emb"].requests == n + 1
        assert not np.allclose(v2.embeddings, v1.embeddings, atol=1e-3)
        assert np.array_equal(c.infer("emb", text).embeddings, v2.embeddings)
        command(c, Op.UPDATE, "lora1", canary=100)              # all requests to the canary
        canary = c.infer("emb", text)
        assert canary.task == "emb@canary" and np.allclose(canary.embeddings, v1.embeddings,
                                                           atol=1e-5)
        assert c.infer("emb", text).task == "emb@canary"       # (its own hit)
        n = stats(c)["emb"].requests
        command(c, Op.ROLLBACK)
        back = c.infer("emb", text)                             # emptied: a miss again
        assert back.task == "emb" and back.version == v2.version
        assert stats(c)["emb"].requests == n + 1
        assert np.allclose(back.embeddings, v2.embeddings, atol=1e-5)
        command(c, Op.UPDATE, "lora1", canary=100)
        c.infer("emb", text)
        n = stats(c)["emb"].requests
        command(c, Op.PROMOTE)
        promoted = c.infer("emb", text)
        assert promoted.task == "emb" and promoted.version > v2.version
        assert stats(c)["emb"].requests == n + 1
        assert np.allclose(promoted.embeddings, v1.embeddings, atol=1e-5)


def test_greedy_and_seeded_generations_are_cached_sampled_ones_are_not(env):
    d, _ = env
    with d.client() as c:
        n = stats(c)["gen"].requests
        first = c.generate("gen", prompt="Once upon a time")
        again = c.generate("gen", prompt="Once upon a time")
        assert again == GenerateReply(**_fields(first, ref=again.ref))
        parts = list(c.stream("gen", prompt="Once upon a time"))   # a streamed hit
        assert [type(p) for p in parts] == [TextDelta, GenerateReply]
        assert parts[0].text == first.text and parts[0].token_ids == first.token_ids
        assert parts[1].token_ids == first.token_ids
        assert stats(c)["gen"].requests == n + 1
        seeded = [c.generate("gen", prompt="Hi", temperature=1.0, seed=11) for _ in range(2)]
        assert seeded[0].token_ids == seeded[1].token_ids
        assert stats(c)["gen"].requests == n + 2
        for _ in range(2):
            c.generate("gen", prompt="Hi", temperature=1.0)      # sampled: always generated
        assert stats(c)["gen"].requests == n + 4

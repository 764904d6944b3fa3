"""A representative instance of every protocol message (small tensors where a message carries
some), schema-generated samples for messages without a hand-written one, and message equality
where numpy arrays compare by dtype, shape and content."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ipc import fields as F
from ipc import messages as M
from ipc.errors import ErrorCode

from bench.wirebench.plan import TENSOR_1MIB_SHAPE


def _backbone_info() -> M.BackboneInfo:
    targets = [M.TargetInfo(name=n, path=p, in_features=i, out_features=o) for n, p, i, o in (
        ("query", "attention.self.query", 384, 384), ("value", "attention.self.value", 384, 384))]
    return M.BackboneInfo(
        name="minilm", family=M.Family.TEXT_ENCODER, model_type="bert", hidden=384, layers=6,
        heads=12, intermediate=1536, dtype="float32", region_bytes=90_868_224,
        checksum="3f2a9c0d5e7b41a8c6d2e0f9b1a7c3d5", targets=targets, max_positions=512,
        vocab=30522, tokenizer="/var/lib/fmplex/backbones/minilm/tokenizer.json")


def _extension() -> M.ExtensionSpec:
    lora = [M.LoraEntry(layer=i, module=m, rank=8, scale=2.0)
            for i in range(6) for m in ("query", "value")]
    head = M.HeadSpec(kind=M.HeadKind.LINEAR, input=M.HeadInput.POOLED, num_labels=3)
    return M.ExtensionSpec(pooling=M.Pooling.MEAN, lora=lora, head=head)


def _slot_grant() -> M.SlotGrant:
    entries, offset = [], 0
    for i in range(6):
        for m in ("query", "value"):
            for ab, shape in (("A", [8, 384]), ("B", [384, 8])):
                entries.append(M.SlotEntry(name=f"layer.{i}.{m}.lora_{ab}", dtype="float32",
                                           shape=shape, offset=offset))
                offset += 4 * 8 * 384
    entries += [M.SlotEntry(name="head.weight", dtype="float32", shape=[3, 384], offset=offset),
                M.SlotEntry(name="head.bias", dtype="float32", shape=[3], offset=offset + 4608)]
    half = offset + 4864
    return M.SlotGrant(generation=1, size=2 * half, half_bytes=half, half=0, entries=entries,
                       token=os.urandom(32))


def _manifest() -> M.Manifest:
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
             "embeddings.LayerNorm.bias"]
    for i in range(6):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense"):
            names += [f"encoder.layer.{i}.{part}.weight", f"encoder.layer.{i}.{part}.bias"]
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            names += [f"encoder.layer.{i}.{ln}.weight", f"encoder.layer.{i}.{ln}.bias"]
    entries = [M.ManifestEntry(name=n, dtype="float32", shape=[384, 384] if n.endswith("weight")
                               else [384], offset=k * 589_824) for k, n in enumerate(names)]
    return M.Manifest(size=len(entries) * 589_824, alignment=256,
                      checksum="3f2a9c0d5e7b41a8c6d2e0f9b1a7c3d5", entries=entries)


def _task_stats(i: int) -> M.TaskStats:
    return M.TaskStats(name=f"task-{i}", state=M.TaskState.READY, owner_uid=1000 + i, weight=1.0,
                       pid=4000 + i, version=3, queued=2, requests=120_000, served_tokens=9_000_000,
                       errors=1, timeouts=0, overloaded=4, p50_ms=3.2, p99_ms=11.5, rate=250.0,
                       endpoint=f"ipc:///run/fmplex/tenants/{1000 + i}/task-{i}.sock")


SPEC_TOML = """name = "sentiment"
backbone = "minilm"
weight = 1.0
queue_limit = 256
deadline_ms = 2000

[pipeline]
kind = "classify"
labels = ["negative", "neutral", "positive"]
max_length = 128

[extension]
pooling = "mean"
weights = "/srv/tasks/sentiment/adapter.safetensors"

[[extension.lora]]
modules = ["query", "value"]
rank = 8
alpha = 16
"""

TEXTS = ["The delivery was quick and the support team answered every question I had.",
         "I would not buy this again; it stopped working after two weeks of light use.",
         "Average product, does what it says, nothing more and nothing less really.",
         "Absolutely love it - the battery lasts for days and the screen is gorgeous."]


def sample_messages() -> list[tuple[str, M.Message]]:
    """A representative instance of every message (small tensors where a message carries some),
    plus a few variants worth seeing. Every entry of ALL_MESSAGES gets one; a message added to
    the protocol without a hand-written sample here gets a schema-generated one marked (auto)."""
    rng = np.random.default_rng(0)
    lengths = [32, 32, 32, 32]
    ids = rng.integers(0, 30522, sum(lengths), dtype=np.int32)
    pooled = rng.standard_normal((4, 384), dtype=np.float32)
    bb = _backbone_info()
    samples = [
        ("Error", M.Error(ref=7, code=ErrorCode.OVERLOADED, message="queue of task 'sentiment' is "
                          "full (256 requests)", epoch=123456789)),
        ("Ok", M.Ok(ref=7)),
        ("Hello", M.Hello(ref=1, proto=M.PROTOCOL_VERSION, role=M.Role.TASK, pid=4242)),
        ("Welcome", M.Welcome(ref=1, proto=M.PROTOCOL_VERSION, epoch=987654321, heartbeat_ms=1000,
                              backbones=[bb])),
        ("Heartbeat", M.Heartbeat(epoch=987654321, seq=12345)),
        ("Register", M.Register(ref=2, task=M.TaskConfig(name="sentiment", owner_uid=1000),
                                extension=_extension(), pid=4242,
                                endpoint="ipc:///run/fmplex/tenants/1000/sentiment.sock",
                                proto=M.PROTOCOL_VERSION)),
        ("Registered", M.Registered(ref=2, epoch=555, slot=_slot_grant(), backbone=bb,
                                    heartbeat_ms=1000)),
        ("Submit", M.Submit(epoch=555, ref=1001, output=M.Output.LOGITS, lengths=lengths, ids=ids,
                            type_ids=np.zeros(sum(lengths), np.int8), deadline_ms=2000)),
        ("Result", M.Result(epoch=555, ref=1001, version=3, output=M.Output.POOLED, data=pooled,
                            queue_ms=0.8, run_ms=4.1)),
        ("Result(1 MiB)", M.Result(epoch=555, ref=1002, version=3, output=M.Output.TOKENS,
                                   data=np.ones(TENSOR_1MIB_SHAPE, np.float32))),
        ("PrepareUpdate", M.PrepareUpdate(epoch=555, ref=3, extension=_extension())),
        ("UpdateReady", M.UpdateReady(epoch=555, ref=3, slot=_slot_grant())),
        ("Commit", M.Commit(epoch=555, ref=4, generation=2, half=1)),
        ("Committed", M.Committed(epoch=555, ref=4, version=4)),
        ("Unregister", M.Unregister(epoch=555, ref=5)),
        ("Command", M.Command(epoch=555, ref=6, op=M.Op.UPDATE, spec=SPEC_TOML, canary_percent=10)),
        ("Info", M.Info(ref=8)),
        ("InfoReply", M.InfoReply(ref=8, epoch=987654321, version="0.1.0", uptime_s=3600.5,
                                  run_dir="/run/fmplex", backbones=[bb],
                                  regions=[M.RegionInfo(name="minilm", kind="backbone",
                                                        bytes=90_868_224)]
                                  + [M.RegionInfo(name=f"slot/task-{i}", kind="slot", bytes=315_392)
                                     for i in range(10)])),
        ("ListTasks", M.ListTasks(ref=9)),
        ("TaskList", M.TaskList(ref=9, tasks=[_task_stats(i) for i in range(10)])),
        ("RemoveTask", M.RemoveTask(ref=10, name="sentiment")),
        ("Deploy", M.Deploy(ref=11, spec=SPEC_TOML, spec_path="/srv/tasks/sentiment/task.toml")),
        ("TaskCommand", M.TaskCommand(ref=12, name="sentiment", op=M.Op.PROMOTE)),
        ("Resolve", M.Resolve(ref=13, name="sentiment")),
        ("Endpoint", M.Endpoint(ref=13, name="sentiment",
                                address="ipc:///run/fmplex/tenants/1000/sentiment.sock")),
        ("Health", M.Health(ref=14, name="sentiment")),
        ("HealthReply", M.HealthReply(ref=14, live=True, ready=True, detail="serving version 3")),
        ("Infer", M.Infer(ref=15, texts=TEXTS, top_k=2, timeout_ms=2000)),
        ("InferReply", M.InferReply(ref=15, task="embedder", version=3, truncated=[False] * 4,
                                    embeddings=pooled)),
        ("InferReply(labels)", M.InferReply(
            ref=15, task="sentiment", version=3, truncated=[False] * 4,
            labels=[[M.LabelScore("positive", 0.91), M.LabelScore("neutral", 0.07)]] * 4)),
        ("OpenRegions", M.OpenRegions(ref=16, token=os.urandom(32))),
        ("RegionsGranted", M.RegionsGranted(ref=16, backbone=_manifest(), slot_size=630_784,
                                            slot_generation=1)),
    ]
    covered = {type(m) for _, m in samples}
    samples += [(f"{cls.__name__} (auto)", _auto_instance(cls))
                for cls in M.ALL_MESSAGES if cls not in covered]
    order = {cls: i for i, cls in enumerate(M.ALL_MESSAGES)}
    return sorted(samples, key=lambda s: order.get(type(s[1]), len(order)))


def _auto_value(spec: F.Spec):
    """A minimal valid value for a field spec (for messages without a hand-written sample)."""
    if isinstance(spec, F.Optional):
        return None
    if isinstance(spec, F.Int):
        return max(spec.lo, min(spec.hi, 1))
    if isinstance(spec, F.Float):
        return float(max(spec.lo, min(spec.hi, 1.0)))
    if isinstance(spec, F.Bool):
        return True
    if isinstance(spec, F.Str):
        return "x" * max(spec.min_len, min(spec.max_len, 8))
    if isinstance(spec, F.Bytes):
        return b"x" * min(spec.max_len, 16)
    if isinstance(spec, F.Enum):
        return next(iter(spec.cls))
    if isinstance(spec, F.ListOf):
        return [_auto_value(spec.item) for _ in range(max(spec.min_len, min(spec.max_len, 2)))]
    if isinstance(spec, F.MapOf):
        return {}
    if isinstance(spec, F.Tensor):
        rank = spec.ndim if spec.ndim is not None else max(1, min(spec.max_ndim, 2))
        return np.zeros((4,) * rank, F.WIRE_DTYPES[spec.dtypes[0]])
    if isinstance(spec, F.Struct):
        return _auto_instance(spec.cls)
    raise TypeError(f"no sample value for {type(spec).__name__}")


def _auto_instance(cls):
    return cls(**{name: _auto_value(spec) for name, spec, required in F.schema_fields(cls)
                  if required})


def same_message(a, b) -> bool:
    """Message equality where numpy arrays compare by dtype, shape and content."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if dataclasses.is_dataclass(a):
        return all(same_message(getattr(a, f.name), getattr(b, f.name))
                   for f in dataclasses.fields(a))
    if isinstance(a, list):
        return len(a) == len(b) and all(same_message(x, y) for x, y in zip(a, b))
    return a == b

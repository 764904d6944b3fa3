"""The codec: every message round-trips; every malformed input is a ProtocolError with the right code.

Malformed inputs are hand-packed MessagePack headers (the way a peer in another language would send
them), so these tests pin the wire format as well as the validation.
"""
from __future__ import annotations

import dataclasses
import enum
import math

import msgpack
import numpy as np
import pytest

from ipc import codec
from ipc.errors import ErrorCode, ProtocolError
from ipc.fields import Optional as OptionalSpec
from ipc.fields import (WIRE_DTYPES, DecodeContext, EncodeContext, ListOf, Struct, Tensor,
                        schema_fields)
from ipc.messages import (CacheStats, BackboneStats, Cancel, CancelRequest, ChatMessage, ChildExit, Family,
                          FinishReason, Generate, GenerateReply, GenerateText, GenerationInfo,
                          Spawn, Spawned, TargetInfo, TextDelta, Tokens, ZygoteReady, ALL_MESSAGES, Activation, BackboneInfo, Command, Commit, Committed,
                          Deploy, Endpoint, Error, ExtensionSpec, HeadInput, HeadKind, HeadSpec,
                          Health, HealthReply, Heartbeat, Hello, Ia3Entry, Infer, InferReply, Info,
                          InfoReply, LabelScore, ListTasks, LoraEntry, Manifest, ManifestEntry,
                          Ok, Op, OpenRegions, Output, Pooling, PrepareUpdate, RegionInfo,
                          RegionsGranted, Register, Registered, RemoveTask, Resolve, Result, Role,
                          SlotEntry, SlotGrant, Submit, TaskCommand, TaskConfig, TaskList,
                          TaskState, TaskStats, TokenLabel, Unregister, UpdateReady, Welcome)
from ipc.messages import (ForecastReply, ImageInfo, InferImages, InferSeries, SeriesInfo,
                          SubmitImages, SubmitSeries)
from ipc.messages import (ClusterDeploy, ClusterRemove, ClusterStatus, ClusterStatusReply,
                          ClusterTask, HostStatus, Route, RouteEndpoint, RouteQuery, RouteTable)

# ---------------------------------------------------------------- comparison


def assert_same(got, want, path="msg"):
    """Deep equality with numpy arrays compared by dtype and contents, and exact types."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), path
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: shape {got.shape} != {want.shape}"
        assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f"), path
    elif dataclasses.is_dataclass(want):
        assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), f"{path}.{f.name}")
    elif isinstance(want, list):
        assert type(got) is list and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, enum.Enum):
        assert got is want, f"{path}: {got!r} is not {want!r}"
    elif isinstance(want, float):
        assert type(got) is float and (got == want or (math.isnan(got) and math.isnan(want))), path
    elif isinstance(want, bool) or want is None:
        assert got is want, f"{path}: {got!r} is not {want!r}"
    else:
        assert type(got) is type(want) and got == want, f"{path}: {got!r} != {want!r}"


def roundtrip(msg):
    frames = codec.encode(msg)
    assert all(isinstance(f, (bytes, memoryview)) for f in frames)
    # What a socket delivers: independent bytes objects.
    got = codec.decode([bytes(f) for f in frames])
    assert_same(got, msg)
    return got, frames


# ---------------------------------------------------------------- one valid instance of each message

BACKBONE = BackboneInfo(name="minilm", family=Family.TEXT_ENCODER, model_type="bert", hidden=384,
                        layers=6, heads=12, intermediate=1536, dtype="float32",
                        region_bytes=90_000_000, checksum="ab" * 16,
                        targets=[TargetInfo(name="query", path="attention.self.query",
                                            in_features=384, out_features=384),
                                 TargetInfo(name="ffn_in", path="intermediate.dense",
                                            in_features=384, out_features=1536)],
                        max_positions=512, vocab=30522, tokenizer="/models/minilm/tokenizer.json")
DECODER = BackboneInfo(name="smol", family=Family.DECODER, model_type="llama", hidden=576, layers=30,
                       heads=9, intermediate=1536, dtype="bfloat16", region_bytes=1 << 28,
                       checksum="cd" * 16, targets=[TargetInfo(name="k_proj",
                                                               path="self_attn.k_proj",
                                                               in_features=576, out_features=192)],
                       max_positions=8192, vocab=49152, tokenizer="/run/fmplex/b/tokenizer.json",
                       generation=GenerationInfo(context=8192, eos_ids=[2], bos_id=1,
                                                 chat_template="{{ messages }}"))
SLOT = SlotGrant(generation=3, size=2 * 4096, half_bytes=4096, half=1,
                 entries=[SlotEntry(name="lora.0.query.A", dtype="float32", shape=[8, 384], offset=0),
                          SlotEntry(name="head.w", dtype="float16", shape=[3, 384], offset=12288)],
                 token=b"\x00\xfftoken" * 4)
FULL_EXT = ExtensionSpec(
    pooling=Pooling.MEAN,
    lora=[LoraEntry(layer=0, module="query", rank=8, scale=2.0),
          LoraEntry(layer=5, module="ffn_out", rank=1024, scale=-0.5)],
    ia3=[Ia3Entry(layer=1, module="value", feedforward=False),
         Ia3Entry(layer=2, module="ffn_in", feedforward=True)],
    prompt_tokens=20,
    head=HeadSpec(kind=HeadKind.MLP, input=HeadInput.TOKENS, num_labels=9, hidden=128,
                  activation=Activation.GELU))
STATS = TaskStats(name="sentiment@canary", state=TaskState.READY, owner_uid=1000, weight=2.5, pid=4242,
                  version=7, queued=3, requests=1_000_000, served_tokens=2**40, errors=1, timeouts=2,
                  overloaded=0, p50_ms=1.25, p99_ms=30.0, rate=123.5, restarts=1,
                  endpoint="ipc:///run/fmplex/tenants/1000/sentiment.sock", family=Family.DECODER,
                  cache_hits=5, cache_misses=2**40, cache_bytes=1 << 20)

VISION = dataclasses.replace(
    BACKBONE, name="dinov2", family=Family.VISION, model_type="dinov2", vocab=0, tokenizer="",
    targets=[TargetInfo(name="query", path="attention.q_proj", in_features=384, out_features=384)],
    image=ImageInfo(size=224, patch=14, resize=256, resample="bicubic", mean=[0.485, 0.456, 0.406],
                    std=[0.229, 0.224, 0.225]))
SERIES = dataclasses.replace(
    BACKBONE, name="fracast", family=Family.TIME_SERIES, model_type="fracast", vocab=0,
    tokenizer="", targets=[TargetInfo(name="out", path="head.out_proj", in_features=64,
                                      out_features=9, per_layer=False)],
    series=SeriesInfo(context=2048, horizon=48, quantiles=[0.1, 0.5, 0.9], min_observed=16))


def _ids(n):
    return np.arange(n, dtype=np.int32) * 7 - 3


def valid_messages():
    """(id, message): at least one instance of every message class, Optional fields set and unset."""
    rng = np.random.default_rng(0)
    return [
        ("error", Error(ref=1, code=ErrorCode.OVERLOADED, message="queue full", epoch=5, room=3,
                        seen=17)),
        ("error-default-epoch", Error(ref=0, code=ErrorCode.INTERNAL, message="")),
        ("ok", Ok(ref=2**64 - 1, message="done")),
        ("ok-default", Ok(ref=0)),
        ("hello", Hello(ref=3, proto=2, role=Role.TASK, pid=1234)),
        ("welcome", Welcome(ref=3, proto=2, epoch=2**63 - 1, heartbeat_ms=500, backbones=[BACKBONE])),
        ("welcome-empty", Welcome(ref=3, proto=2, epoch=1, heartbeat_ms=1, backbones=[])),
        ("heartbeat", Heartbeat(epoch=99, seq=2**64 - 1)),
        ("cache_stats", CacheStats(epoch=99, hits=2**64 - 1, misses=0, entries=3, bytes=4096)),
        ("register", Register(ref=4, proto=2, task=TaskConfig(name="sentiment", owner_uid=1000, weight=0.5,
                                                     queue_limit=64, deadline_ms=2000,
                                                     backbone="minilm", family=Family.VISION),
                              extension=FULL_EXT, pid=77, endpoint="ipc:///tmp/x.sock",
                              tcp_endpoint="tcp://0.0.0.0:7000", server_key="Z" * 40)),
        ("register-defaults", Register(ref=4, proto=2, task=TaskConfig(name="t", owner_uid=0),
                                       extension=ExtensionSpec())),
        ("registered", Registered(ref=4, epoch=12345, slot=SLOT, backbone=BACKBONE, heartbeat_ms=250)),
        ("submit", Submit(epoch=1, ref=5, output=Output.TOKEN_LOGITS, lengths=[3, 5], ids=_ids(8),
                          type_ids=np.array([0, 0, 0, 0, 0, 1, 1, 1], dtype=np.int8), deadline_ms=50)),
        ("submit-no-type-ids", Submit(epoch=1, ref=5, output=Output.POOLED, lengths=[4], ids=_ids(4))),
        ("result-f32", Result(epoch=1, ref=5, version=2, output=Output.POOLED,
                              data=rng.standard_normal((2, 16)).astype(np.float32),
                              queue_ms=0.5, run_ms=3.25, room=7, seen=1)),
        ("result-f16", Result(epoch=1, ref=5, version=0, output=Output.LOGITS,
                              data=rng.standard_normal((3, 4)).astype(np.float16))),
        ("result-empty", Result(epoch=1, ref=5, version=0, output=Output.TOKENS,
                                data=np.zeros((0, 384), dtype=np.float32))),
        ("prepare-update", PrepareUpdate(epoch=1, ref=6, extension=FULL_EXT)),
        ("update-ready", UpdateReady(epoch=1, ref=6, slot=SLOT)),
        ("commit", Commit(epoch=1, ref=7, generation=3, half=0)),
        ("committed", Committed(epoch=1, ref=7, version=4)),
        ("unregister", Unregister(epoch=1, ref=8)),
        ("command", Command(epoch=1, ref=9, op=Op.UPDATE, spec='name = "x"\n', spec_dir="/etc/fmplex",
                            canary_percent=10)),
        ("command-default", Command(epoch=1, ref=9, op=Op.STOP)),
        ("info", Info(ref=10)),
        ("info-reply", InfoReply(ref=10, epoch=3, version="0.1.0", uptime_s=12.5, run_dir="/run/fmplex",
                                 backbones=[BACKBONE, DECODER],
                                 regions=[RegionInfo(name="backbone:minilm", kind="backbone", bytes=9),
                                          RegionInfo(name="slot:t", kind="slot", bytes=8192)],
                                 load=[BackboneStats(name="smol", batches=7, tokens_per_s=812.5,
                                                     kv_blocks_total=100, kv_blocks_used=3,
                                                     kv_block_tokens=16, kv_tokens=40,
                                                     sequences=1,
                                                     preemptions=2),
                                       BackboneStats(name="minilm")],
                                 metrics="http://127.0.0.1:9464/metrics")),
        ("list-tasks", ListTasks(ref=11)),
        ("task-list", TaskList(ref=11, tasks=[STATS, dataclasses.replace(
            STATS, name="other", state=TaskState.DEAD, restarts=0, endpoint="")])),
        ("task-list-empty", TaskList(ref=11, tasks=[])),
        ("remove-task", RemoveTask(ref=12, name="sentiment@canary")),
        ("deploy", Deploy(ref=13, spec="name = 'x'", spec_path="/etc/fmplex/x.toml")),
        ("deploy-default", Deploy(ref=13, spec="s")),
        ("task-command", TaskCommand(ref=14, name="x", op=Op.UPDATE, spec="name = 'x'",
                                     spec_dir="/srv/specs", canary_percent=100)),
        ("task-command-default", TaskCommand(ref=14, name="x", op=Op.PROMOTE)),
        ("resolve", Resolve(ref=15, name="x")),
        ("endpoint", Endpoint(ref=15, name="x", address="ipc:///run/fmplex/x.sock",
                              tcp_endpoint="tcp://10.0.0.1:5555", server_key="k" * 40)),
        ("health", Health(ref=16, name="x", wait_ms=250, not_pid=4242)),
        ("health-default", Health(ref=16)),
        ("health-reply", HealthReply(ref=16, live=True, ready=False, detail="loading")),
        ("infer", Infer(ref=17, texts=["héllo wörld", "✓ unicode"], pairs=["a", "b"], top_k=3,
                        timeout_ms=100, proto=2)),
        ("infer-no-pairs", Infer(ref=17, texts=[""])),
        ("infer-reply-full", InferReply(
            ref=17, task="x@canary", version=2, truncated=[False, True],
            labels=[[LabelScore("pos", 0.9), LabelScore("neg", 0.1)], []],
            embeddings=rng.standard_normal((2, 8)).astype(np.float32),
            similarity=[0.5, -1.0],
            tokens=[[TokenLabel(start=0, end=5, label="PER", score=0.99)], []], prompt_tokens=9)),
        ("infer-reply-none", InferReply(ref=17, task="x", version=0, truncated=[])),
        ("open-regions", OpenRegions(ref=18, token=b"\x00" * 64)),
        ("regions-granted", RegionsGranted(
            ref=18, backbone=Manifest(size=4096, alignment=256, checksum="cd" * 16, entries=[
                ManifestEntry(name="embeddings.word", dtype="bfloat16", shape=[30522, 384], offset=0),
                ManifestEntry(name="scalar", dtype="float32", shape=[], offset=256)]),
            slot_size=8192, slot_generation=1)),
        ("generate", Generate(epoch=1, ref=30, prompt=_ids(5), max_tokens=64, temperature=0.7,
                              top_p=0.9, top_k=40, seed=2**64 - 1, stop_ids=[2, 0],
                              ignore_eos=True, deadline_ms=500)),
        ("generate-default", Generate(epoch=1, ref=30, prompt=_ids(1), max_tokens=1)),
        ("tokens", Tokens(epoch=1, ref=30, ids=[42], finish=FinishReason.LENGTH, prompt_tokens=5,
                          completion_tokens=64, version=2, room=256, seen=3)),
        ("tokens-default", Tokens(epoch=1, ref=30, ids=[])),
        ("cancel", Cancel(epoch=1, ref=30)),
        ("generate-text", GenerateText(
            ref=31, messages=[ChatMessage(role="system", content="be brief"),
                              ChatMessage(role="user", content="héllo")],
            max_tokens=10, temperature=0.0, top_p=1.0, top_k=0, seed=1, stop=["\n\n"],
            stop_token_ids=[2], stream=True, ignore_eos=True, timeout_ms=9000, proto=2)),
        ("generate-text-prompt", GenerateText(ref=31, prompt="<|im_start|>user\nhi")),
        ("text-delta", TextDelta(ref=31, text="Par", token_ids=[12, 34])),
        ("generate-reply", GenerateReply(ref=31, task="chat@canary", version=3, text="Paris.",
                                         token_ids=[7042, 30, 2], prompt_tokens=12,
                                         completion_tokens=3,
                                         finish_reason=FinishReason.STOP)),
        ("cancel-request", CancelRequest(ref=31)),
        ("zygote-ready", ZygoteReady(pid=321)),
        ("spawn", Spawn(ref=19, name="t@canary", spec="/run/fmplex/specs/t.toml",
                        log="/run/fmplex/logs/t.log", env={"PATH": "/usr/bin", "EMPTY": ""},
                        uid=65534, gid=65534, nice=10,
                        cgroups=["/sys/fs/cgroup/system.slice/fmplexd.service/tasks/t/cgroup.procs"])),
        ("spawn-default", Spawn(ref=19, name="t", spec="/s.toml", log="/l.log", env={})),
        ("spawned", Spawned(ref=19, pid=4321)),
        ("child-exit", ChildExit(pid=4321, code=-9)),
        # -- vision and time-series families
        ("welcome-vision-series", Welcome(ref=3, proto=2, epoch=1, heartbeat_ms=1,
                                          backbones=[VISION, SERIES])),
        ("task-list-families", TaskList(ref=11, tasks=[dataclasses.replace(
            STATS, backbone="dinov2", device_ms=1234.5)])),
        ("submit-images", SubmitImages(epoch=1, ref=20, output=Output.LOGITS, deadline_ms=5,
                                       pixels=rng.standard_normal((2, 3, 28, 14)).astype(np.float32))),
        ("submit-series", SubmitSeries(epoch=1, ref=21, output=Output.FORECAST, deadline_ms=7,
                                       values=np.array([[np.nan, 0.0, 0.5, 1.0]], np.float32))),
        ("infer-images", InferImages(ref=22, images=[b"\x89PNG\r\n", b""], top_k=2, timeout_ms=9,
                                     proto=2)),
        ("infer-series", InferSeries(ref=23, values=np.array([[1.0, np.nan, 3.5]], np.float32),
                                     horizon=96, quantiles=[0.1, 0.5], top_k=1, timeout_ms=9,
                                     proto=2)),
        ("infer-series-default", InferSeries(ref=23, values=np.zeros((2, 0), np.float32))),
        ("forecast-reply", ForecastReply(ref=23, task="co2", version=1, quantiles=[0.1, 0.5],
                                         forecast=np.ones((1, 96, 2), np.float32),
                                         truncated=[True])),
        # ---- cluster routing
        ("route-query", RouteQuery(ref=20, tasks=["sentiment", "topic"], wait_ms=2500,
                                   avoid=["tcp://10.0.0.2:7001"])),
        ("route-query-default", RouteQuery(ref=20)),
        ("route-table", RouteTable(ref=20, version=2**64 - 1, routes=[
            Route(task="sentiment", endpoints=[
                RouteEndpoint(host="n1", address="tcp://10.0.0.1:7001", server_key="K" * 40,
                              load=0.25),
                RouteEndpoint(host="n2", address="tcp://10.0.0.2:7001", server_key="L" * 40)]),
            Route(task="topic", endpoints=[])])),
        ("cluster-deploy", ClusterDeploy(ref=21, spec='name = "x"\n', spec_dir="/srv/specs",
                                         rate=12.5, slo_ms=250, min_replicas=2, max_replicas=4,
                                         memory_bytes=1 << 20)),
        ("cluster-deploy-default", ClusterDeploy(ref=21, spec="s")),
        ("cluster-remove", ClusterRemove(ref=22, name="x")),
        ("cluster-status", ClusterStatus(ref=23)),
        ("cluster-status-reply", ClusterStatusReply(
            ref=23, version=7,
            hosts=[HostStatus(name="n0", alive=True, backbones=["default", "dinov2"],
                              memory_bytes=24 << 30, used_bytes=300 << 20, load=0.5, tasks=3)],
            tasks=[ClusterTask(name="x", backbone="default", replicas=2, hosts=["n0", "n1"],
                               rate=40.0, p99_ms=88.5, slo_ms=250)])),
    ]


VALID = valid_messages()


def test_every_message_class_has_a_valid_instance():
    assert {type(m) for _, m in VALID} == set(ALL_MESSAGES)
    assert len({cls.TYPE for cls in ALL_MESSAGES}) == len(ALL_MESSAGES)


def _schemas(cls, out: set) -> set:
    """cls and every struct class reachable from its fields."""
    out.add(cls)
    for _, spec, _ in schema_fields(cls):
        while isinstance(spec, (OptionalSpec, ListOf)):
            spec = spec.inner if isinstance(spec, OptionalSpec) else spec.item
        if isinstance(spec, Struct) and spec.cls not in out:
            _schemas(spec.cls, out)
    return out


def _exercised(value, out: set) -> set:
    """(class, field) pairs that some (nested) value sets to something other than its default."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else
                       dataclasses.MISSING)
            if default is dataclasses.MISSING or isinstance(v, np.ndarray) or v != default:
                out.add((type(value), f.name))
            _exercised(v, out)
    elif isinstance(value, list):
        for v in value:
            _exercised(v, out)
    return out


def test_every_field_of_every_schema_is_exercised():
    """A new field must be added to an instance above with a non-default value (so that it is
    round-tripped, not just defaulted on both sides)."""
    want = {(cls, f.name) for top in ALL_MESSAGES for cls in _schemas(top, set())
            for f in dataclasses.fields(cls)}
    got = set()
    for _, msg in VALID:
        _exercised(msg, got)
    assert sorted(f"{c.__name__}.{n}" for c, n in want - got) == []


@pytest.mark.parametrize("msg", [m for _, m in VALID], ids=[i for i, _ in VALID])
def test_roundtrip(msg):
    got, frames = roundtrip(msg)
    header = msgpack.unpackb(frames[0], raw=False)
    assert header["type"] == msg.TYPE
    # None-valued (unset Optional) fields are left out of the header, set ones are carried.
    for f in dataclasses.fields(msg):
        assert (f.name in header) == (getattr(msg, f.name) is not None), f.name
    # One out-of-band frame per tensor field set; the header carries only its description.
    tensors = [v for v in (getattr(msg, f.name) for f in dataclasses.fields(msg))
               if isinstance(v, np.ndarray)]
    assert len(frames) == 1 + len(tensors)


def test_roundtrip_of_frames_as_memoryview_and_bytearray():
    _, msg = VALID[[i for i, _ in VALID].index("submit")]
    frames = codec.encode(msg)
    assert_same(codec.decode(frames), msg)   # the encoder's own buffers (memoryviews)
    assert_same(codec.decode([bytearray(f) for f in frames]), msg)
    assert_same(codec.decode(tuple(memoryview(bytes(f)) for f in frames)), msg)


def test_optional_fields_may_be_sent_as_nil():
    header = {"type": "submit", "epoch": 1, "ref": 1, "output": "pooled", "lengths": [2],
              "ids": {"dtype": "int32", "shape": [2], "frame": 1}, "type_ids": None}
    msg = codec.decode([msgpack.packb(header), _ids(2).tobytes()])
    assert msg.type_ids is None and msg.deadline_ms == 0


def test_float_field_accepts_an_int_and_yields_a_float():
    header = {"type": "result", "epoch": 1, "ref": 1, "version": 0, "output": "pooled",
              "data": {"dtype": "float32", "shape": [1, 1], "frame": 1}, "queue_ms": 3}
    msg = codec.decode([msgpack.packb(header), np.ones((1, 1), np.float32).tobytes()])
    assert type(msg.queue_ms) is float and msg.queue_ms == 3.0


def test_two_tensors_use_distinct_frames_in_field_order():
    msg = Submit(epoch=1, ref=1, output=Output.POOLED, lengths=[3], ids=_ids(3),
                 type_ids=np.array([1, 0, 1], np.int8))
    frames = codec.encode(msg)
    header = msgpack.unpackb(frames[0], raw=False)
    assert header["ids"] == {"dtype": "int32", "shape": [3], "frame": 1}
    assert header["type_ids"] == {"dtype": "int8", "shape": [3], "frame": 2}
    assert bytes(frames[1]) == _ids(3).astype("<i4").tobytes()
    assert bytes(frames[2]) == b"\x01\x00\x01"


def test_frames_may_come_in_any_order_the_header_names():
    header = {"type": "submit", "epoch": 1, "ref": 1, "output": "pooled", "lengths": [3],
              "ids": {"dtype": "int32", "shape": [3], "frame": 2},
              "type_ids": {"dtype": "int8", "shape": [3], "frame": 1}}
    msg = codec.decode([msgpack.packb(header), b"\x00\x01\x00", _ids(3).tobytes()])
    assert np.array_equal(msg.ids, _ids(3)) and np.array_equal(msg.type_ids, [0, 1, 0])


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize("name", sorted(WIRE_DTYPES))
def test_tensor_spec_roundtrips_every_wire_dtype(name):
    spec = Tensor()
    dt = WIRE_DTYPES[name]
    arr = (np.arange(24) - 12).astype(dt).reshape(2, 3, 4)
    ectx = EncodeContext()
    wire = spec.encode(arr, ectx)
    assert wire == {"dtype": name, "shape": [2, 3, 4], "frame": 1}
    got = spec.check(wire, DecodeContext([bytes(b) for b in ectx.buffers]))
    assert got.dtype == dt and np.array_equal(got, arr)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_result_roundtrips_each_allowed_dtype(dtype):
    data = (np.arange(12, dtype=np.float64).reshape(3, 4) / 7).astype(dtype)
    roundtrip(Result(epoch=1, ref=1, version=0, output=Output.LOGITS, data=data))


def test_decoded_tensor_is_a_read_only_view_of_the_frame():
    frames = [bytes(f) for f in codec.encode(VALID[[i for i, _ in VALID].index("submit")][1])]
    frames[1] = bytearray(frames[1])   # even over a writable buffer
    msg = codec.decode(frames)
    assert not msg.ids.flags.writeable
    assert np.shares_memory(msg.ids, np.frombuffer(frames[1], np.uint8))
    with pytest.raises(ValueError):
        msg.ids[0] = 1


def test_encode_does_not_copy_contiguous_arrays():
    ids = _ids(16)
    frames = codec.encode(Submit(epoch=1, ref=1, output=Output.POOLED, lengths=[16], ids=ids))
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), ids)


def test_non_contiguous_and_big_endian_arrays_are_sent_as_their_values():
    strided = np.arange(20, dtype=np.int32)[::2]
    got, _ = roundtrip(Submit(epoch=1, ref=1, output=Output.POOLED, lengths=[10], ids=strided))
    assert np.array_equal(got.ids, strided)
    big = (np.arange(6, dtype=np.float32).reshape(2, 3) / 3).astype(">f4")
    assert big.dtype.byteorder == ">"
    got = codec.decode([bytes(f) for f in codec.encode(
        Result(epoch=1, ref=1, version=0, output=Output.POOLED, data=big))])
    assert got.data.dtype == np.dtype("<f4")
    assert np.array_equal(got.data, big)


def test_encoding_a_tensor_of_a_dtype_the_field_does_not_allow_fails():
    with pytest.raises(TypeError):
        codec.encode(Submit(epoch=1, ref=1, output=Output.POOLED, lengths=[2],
                            ids=np.zeros(2, np.float32)))
    with pytest.raises(TypeError):
        codec.encode(Result(epoch=1, ref=1, version=0, output=Output.POOLED,
                            data=np.zeros((1, 1), np.float64)))


# ---------------------------------------------------------------- malformed input


def pack(header) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def decode_err(frames, allowed=None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode(frames, allowed)
    assert type(info.value.code) is ErrorCode
    return info.value


def submit_header(**over):
    h = {"type": "submit", "epoch": 1, "ref": 1, "output": "pooled", "lengths": [2, 2],
         "ids": {"dtype": "int32", "shape": [4], "frame": 1}}
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


_DROP = object()
IDS4 = _ids(4).tobytes()
HELLO = {"type": "hello", "ref": 1, "proto": 2, "role": "task"}


def test_hand_packed_headers_are_valid():
    assert codec.decode([pack(submit_header()), IDS4]).lengths == [2, 2]
    assert codec.decode([pack(HELLO)]) == Hello(ref=1, proto=2, role=Role.TASK)


def test_unknown_type():
    e = decode_err([pack({"type": "launch_missiles", "ref": 1})])
    assert e.code is ErrorCode.UNKNOWN_TYPE and "launch_missiles" in e.message


def test_type_not_allowed_on_this_socket():
    e = decode_err([pack(HELLO)], allowed=frozenset({Submit}))
    assert e.code is ErrorCode.UNEXPECTED


@pytest.mark.parametrize("header", [
    [1, 2, 3], "submit", 7, None, b"bin", {}, {"ref": 1}, {"type": 5}, {"type": None},
    {"type": b"hello"}, {"type": ["hello"]},
], ids=repr)
def test_header_must_be_a_map_with_a_string_type(header):
    assert decode_err([pack(header)]).code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("field", ["epoch", "ref", "output", "lengths", "ids"])
def test_missing_required_field(field):
    frames = [pack(submit_header(**{field: _DROP})), IDS4]
    if field == "ids":
        frames = frames[:1]
    e = decode_err(frames)
    assert e.code is ErrorCode.BAD_MESSAGE
    assert e.message == f"field {field}: missing"


def test_missing_field_in_nested_struct():
    header = {"type": "register", "ref": 1, "proto": 2, "task": {"owner_uid": 0}, "extension": {}}
    e = decode_err([pack(header)])
    assert e.code is ErrorCode.BAD_MESSAGE and "task.name" in e.message and "missing" in e.message


def test_extra_field():
    e = decode_err([pack(submit_header(priority=9)), IDS4])
    assert e.code is ErrorCode.BAD_MESSAGE
    assert "unknown field" in e.message and "priority" in e.message


def test_extra_field_in_nested_struct():
    header = {"type": "prepare_update", "epoch": 1, "ref": 1,
              "extension": {"lora": [{"layer": 0, "module": "query", "rank": 4, "scale": 1.0,
                                      "dropout": 0.1}]}}
    e = decode_err([pack(header)])
    assert e.code is ErrorCode.BAD_MESSAGE
    assert "extension.lora[0]" in e.message and "dropout" in e.message


def test_extra_binary_key():
    e = decode_err([pack({**HELLO, b"ref2": 1})])
    assert e.code is ErrorCode.BAD_MESSAGE and "unknown field" in e.message


@pytest.mark.parametrize("value,why", [
    (True, "expected int, got bool"),
    (False, "expected int, got bool"),
    ("1", "expected int, got str"),
    (1.0, "expected int, got float"),
    (None, "expected int, got NoneType"),
    ([1], "expected int, got list"),
    (b"\x01", "expected int, got bytes"),
])
def test_wrong_type_for_int(value, why):
    e = decode_err([pack({**HELLO, "ref": value})])
    assert e.code is ErrorCode.BAD_MESSAGE
    assert e.message == f"field ref: {why}"


def test_wrong_type_for_bool_str_bytes():
    e = decode_err([pack({"type": "health_reply", "ref": 1, "live": 1, "ready": True})])
    assert e.code is ErrorCode.BAD_MESSAGE and e.message == "field live: expected bool, got int"
    e = decode_err([pack({"type": "ok", "ref": 1, "message": b"bytes"})])
    assert e.message == "field message: expected str, got bytes"
    e = decode_err([pack({"type": "open_regions", "ref": 1, "token": "text"})])
    assert e.message == "field token: expected bin, got str"


@pytest.mark.parametrize("value", [math.nan, -math.nan, "1.0", True, None])
def test_bad_float(value):
    header = {"type": "result", "epoch": 1, "ref": 1, "version": 0, "output": "pooled",
              "data": {"dtype": "float32", "shape": [1, 1], "frame": 1}, "queue_ms": value}
    e = decode_err([pack(header), b"\x00" * 4])
    assert e.code is ErrorCode.BAD_MESSAGE and e.message.startswith("field queue_ms: ")


def test_nan_deep_inside_names_its_path():
    header = {"type": "infer_reply", "ref": 1, "task": "t", "version": 0, "truncated": [False],
              "labels": [[{"label": "a", "score": 0.5}, {"label": "b", "score": math.nan}]]}
    e = decode_err([pack(header)])
    assert e.code is ErrorCode.BAD_MESSAGE and "field labels[0][1].score:" in e.message


def test_negative_float_below_lower_bound():
    e = decode_err([pack({"type": "info_reply", "ref": 1, "epoch": 1, "version": "v",
                          "uptime_s": -1.0, "run_dir": "/", "backbones": [], "regions": []})])
    assert e.code is ErrorCode.BAD_MESSAGE and "field uptime_s:" in e.message


@pytest.mark.parametrize("header,path", [
    (submit_header(lengths=[2, 0]), "lengths[1]"),               # Int(1, 8192)
    (submit_header(lengths=[2, 8193]), "lengths[1]"),
    (submit_header(epoch=0), "epoch"),                           # epochs start at 1
    (submit_header(epoch=2**63), "epoch"),
    (submit_header(ref=-1), "ref"),
    (submit_header(deadline_ms=3_600_001), "deadline_ms"),
    ({"type": "commit", "epoch": 1, "ref": 1, "generation": 1, "half": 2}, "half"),
    ({"type": "commit", "epoch": 1, "ref": 1, "generation": 0, "half": 0}, "generation"),
    ({"type": "error", "ref": 1, "code": "internal", "message": "", "epoch": 2**64 - 1}, "epoch"),
    ({"type": "prepare_update", "epoch": 1, "ref": 1,
      "extension": {"lora": [{"layer": 0, "module": "query", "rank": 4, "scale": 1.0},
                             {"layer": 256, "module": "key", "rank": 4, "scale": 1.0}]}},
     "extension.lora[1].layer"),
    ({"type": "prepare_update", "epoch": 1, "ref": 1,
      "extension": {"head": {"kind": "mlp", "input": "pooled", "num_labels": 0}}},
     "extension.head.num_labels"),
])
def test_int_out_of_range_names_the_path(header, path):
    frames = [pack(header)] + ([IDS4] if header["type"] == "submit" else [])
    e = decode_err(frames)
    assert e.code is ErrorCode.BAD_MESSAGE
    assert e.message.startswith(f"field {path}: ") and "outside" in e.message


@pytest.mark.parametrize("header,path", [
    ({**HELLO, "role": "admin"}, "role"),
    ({**HELLO, "role": "TASK"}, "role"),
    ({**HELLO, "role": 0}, "role"),
    ({**HELLO, "role": None}, "role"),
    (submit_header(output="everything"), "output"),
    ({"type": "error", "ref": 1, "code": "no_such_code", "message": ""}, "code"),
    ({"type": "register", "ref": 1, "proto": 2, "extension": {},
      "task": {"name": "t", "owner_uid": 0, "family": "audio"}}, "task.family"),
])
def test_bad_enum_value(header, path):
    frames = [pack(header)] + ([IDS4] if header["type"] == "submit" else [])
    e = decode_err(frames)
    assert e.code is ErrorCode.BAD_MESSAGE
    assert e.message.startswith(f"field {path}: ") and "is not one of" in e.message


@pytest.mark.parametrize("header,path", [
    ({"type": "register", "ref": 1, "proto": 2, "task": {"name": "has space", "owner_uid": 0},
      "extension": {}}, "task.name"),
    ({"type": "register", "ref": 1, "proto": 2, "task": {"name": "", "owner_uid": 0}, "extension": {}},
     "task.name"),
    ({"type": "resolve", "ref": 1, "name": "x" * 65}, "name"),
    ({"type": "resolve", "ref": 1, "name": "-leading-dash"}, "name"),
    ({"type": "open_regions", "ref": 1, "token": b"t" * 65}, "token"),
    (submit_header(lengths=[]), "lengths"),
    (submit_header(lengths=[1] * 1025), "lengths"),
    (submit_header(lengths={"a": 1}), "lengths"),
    ({"type": "infer", "ref": 1, "texts": ["ok", 5]}, "texts[1]"),
    ({"type": "register", "ref": 1, "proto": 2, "task": [], "extension": {}}, "task"),
])
def test_strings_lists_and_structs_out_of_spec(header, path):
    frames = [pack(header)] + ([IDS4] if header["type"] == "submit" else [])
    e = decode_err(frames)
    assert e.code is ErrorCode.BAD_MESSAGE and e.message.startswith(f"field {path}: ")


@pytest.mark.parametrize("ids", [
    {"dtype": "float32", "shape": [4], "frame": 1},              # dtype the field does not allow
    {"dtype": "complex64", "shape": [4], "frame": 1},
    {"dtype": "int32", "shape": [2, 2], "frame": 1},             # ndim above the field's max
    {"dtype": "int32", "shape": [-4], "frame": 1},
    {"dtype": "int32", "shape": [True], "frame": 1},
    {"dtype": "int32", "shape": 4, "frame": 1},
    {"dtype": "int32", "shape": [4]},                            # not the {dtype, shape, frame} map
    {"dtype": "int32", "shape": [4], "frame": 1, "strides": [4]},
    [b"\x00"],
])
def test_bad_tensor_description(ids):
    e = decode_err([pack(submit_header(ids=ids)), IDS4])
    assert e.code is ErrorCode.BAD_MESSAGE and e.message.startswith("field ids: ")


def test_tensor_frame_missing():
    e = decode_err([pack(submit_header())])
    assert e.code is ErrorCode.BAD_FRAME and e.message.startswith("field ids: ")
    e = decode_err([pack(submit_header(ids={"dtype": "int32", "shape": [4], "frame": 2})), IDS4])
    assert e.code is ErrorCode.BAD_FRAME
    e = decode_err([pack(submit_header(ids={"dtype": "int32", "shape": [4], "frame": 0})), IDS4])
    assert e.code is ErrorCode.BAD_FRAME
    e = decode_err([pack(submit_header(ids={"dtype": "int32", "shape": [4], "frame": True})), IDS4])
    assert e.code is ErrorCode.BAD_FRAME


def test_tensor_frame_referenced_twice():
    header = submit_header(type_ids={"dtype": "int8", "shape": [4], "frame": 1})
    e = decode_err([pack(header), IDS4])
    assert e.code is ErrorCode.BAD_FRAME and e.message.startswith("field type_ids: ")
    e = decode_err([pack(header), IDS4, b"\x00" * 4])     # twice, with a spare frame left over
    assert e.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("frame", [b"", IDS4[:-1], IDS4 + b"\x00", IDS4 * 2],
                         ids=["empty", "short", "long", "double"])
def test_tensor_frame_wrong_byte_length(frame):
    e = decode_err([pack(submit_header()), frame])
    assert e.code is ErrorCode.BAD_FRAME and e.message.startswith("field ids: ")
    assert f"holds {len(frame)} bytes" in e.message


def test_unreferenced_extra_frame():
    e = decode_err([pack(submit_header()), IDS4, b"spare"])
    assert e.code is ErrorCode.BAD_FRAME and "unreferenced" in e.message
    e = decode_err([pack(HELLO), b""])
    assert e.code is ErrorCode.BAD_FRAME and "unreferenced" in e.message


def test_header_too_large():
    big = pack({"type": "ok", "ref": 1, "message": "x" * codec.MAX_HEADER_BYTES})
    assert len(big) > codec.MAX_HEADER_BYTES
    assert decode_err([big]).code is ErrorCode.TOO_LARGE
    junk = b"\xc1" * (codec.MAX_HEADER_BYTES + 1)   # refused before parsing
    assert decode_err([junk]).code is ErrorCode.TOO_LARGE


def test_header_at_the_limit_is_parsed():
    filler = pack({"type": "ok", "ref": 1, "message": ""})
    header = filler + b"\x00" * (codec.MAX_HEADER_BYTES - len(filler))
    assert len(header) == codec.MAX_HEADER_BYTES
    e = decode_err([header])   # parsed (and refused for its trailing bytes), not TOO_LARGE
    assert e.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("ext", [
    msgpack.ExtType(1, b"\x80\x04K\x01."),       # what a pickled value would ride in
    msgpack.ExtType(42, b""),
    msgpack.ExtType(127, b"x" * 300),
    msgpack.Timestamp(1, 5),                     # ext -1, which msgpack would decode by itself
])
def test_msgpack_ext_types_are_refused(ext):
    for header in ({**HELLO, "ref": ext}, {**HELLO, "extra": [1, {"k": ext}]}, ext):
        e = decode_err([msgpack.packb(header, use_bin_type=True)])
        assert e.code is ErrorCode.BAD_FRAME, header


def test_raw_timestamp_ext_is_refused():
    header = b"\x82\xa4type\xa2ok\xa3ref\xd6\xff\x00\x00\x00\x01"   # ref: fixext4 type -1
    assert decode_err([header]).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("frames", [[], [pack(HELLO)] + [b""] * codec.MAX_FRAMES,
                                    [b""] * (codec.MAX_FRAMES + 1)], ids=["zero", "66a", "66b"])
def test_frame_count(frames):
    assert decode_err(frames).code is ErrorCode.BAD_FRAME


def test_max_frames_is_accepted_when_all_are_referenced():
    # No message has 64 tensor fields; 64 frames still get past the count check to the references.
    frames = [pack(HELLO)] + [b""] * (codec.MAX_FRAMES - 1)
    e = decode_err(frames)
    assert e.code is ErrorCode.BAD_FRAME and "64 unreferenced" in e.message


@pytest.mark.parametrize("frames", [b"\x81", "hello", None, 5, {0: b""}], ids=repr)
def test_frames_not_a_list(frames):
    assert decode_err(frames).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("frame", ["text", 5, None, np.zeros(4, np.uint8),
                                   memoryview(np.zeros((4, 4), np.uint8)[:, ::2])],
                         ids=["str", "int", "None", "ndarray", "strided-memoryview"])
def test_frame_of_a_wrong_kind(frame):
    assert decode_err([frame]).code is ErrorCode.BAD_FRAME
    assert decode_err([pack(submit_header()), frame]).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("raw", [
    b"", b"\xc1", b"\x81", b"\x81\xa4type", b"\xdf\xff\xff\xff\xff",    # truncated / reserved
    pack(HELLO)[:-1], pack(HELLO) + b"\x00",                           # short, trailing data
    b"\x81\xa4type\xa2\xff\xfe",                                        # invalid UTF-8 str
    b"\x81\x01\xa5hello",                                               # int map key
    b"\x81\x80\xa5hello",                                               # map as map key
])
def test_not_valid_messagepack(raw):
    assert decode_err([raw]).code is ErrorCode.BAD_FRAME


def test_huge_declared_container_is_refused_without_allocating():
    # An array header claiming 2**32-1 elements in a 5-byte frame.
    assert decode_err([b"\xdd\xff\xff\xff\xff"]).code is ErrorCode.BAD_FRAME
    assert decode_err([b"\x81\xa4type\xdd\x00\x20\x00\x00"]).code is ErrorCode.BAD_FRAME


def test_error_str_carries_code_and_path():
    e = decode_err([pack(submit_header(lengths=[1, 0])), IDS4])
    assert str(e).startswith("bad_message: field lengths[1]: ")


def test_peek_ref():
    assert codec.peek_ref([pack({**HELLO, "role": "admin", "ref": 77})]) == 77
    assert codec.peek_ref([pack({"type": "nope", "ref": 5})]) == 5
    for bad in ([b"\xc1"], [pack({"ref": -1})], [pack({"ref": "1"})], [pack([1])], [], ["x"]):
        assert codec.peek_ref(bad) == 0


def test_a_target_name_outside_its_pattern_names_the_path():
    """Target names are the backbone family's (checked against BackboneInfo.targets when the slot
    is laid out); the wire only bounds their form."""
    header = {"type": "prepare_update", "epoch": 1, "ref": 1,
              "extension": {"ia3": [{"layer": 0, "module": "Mlp!", "feedforward": True}]}}
    e = decode_err([pack(header)])
    assert e.code is ErrorCode.BAD_MESSAGE
    assert e.message.startswith("field extension.ia3[0].module: ") and "does not match" in e.message

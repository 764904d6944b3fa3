#!/usr/bin/env python3
"""IPC benchmarks: codec cost per message, ipc:// round trips between two processes, and the import
of a 100 MB shared-memory region through the handle plane.

    python bench/ipc.py [--quick] [--out DIR]        (from the repository root)

Prints a markdown table last (goals marked PASS/FAIL) and writes ipc.json with every figure to --out
(default: a fresh temporary directory). The same file runs its own child processes (`--child ...`):
an echo peer (ROUTER) for the round trips and an importer for the shared-memory import.
"""
from __future__ import annotations

import os
import sys

# `python bench/ipc.py` puts bench/ first on sys.path, where this very file would shadow the `ipc`
# package. Drop that entry and put the repository root first, so this checkout's ipc/ is measured.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from itertools import repeat  # noqa: E402

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

from ipc import aio, codec, transport  # noqa: E402
from ipc import fields as F  # noqa: E402
from ipc import messages as M  # noqa: E402
from ipc.errors import ErrorCode, FmplexError, ProtocolError  # noqa: E402

perf_ns = time.perf_counter_ns

GOAL_SMALL_P50_US = 60.0
GOAL_IMPORT_US = 1000.0
GOAL_IMPORT_RSS_MB = 5.0
REGION_ELEMS = 25_000_000              # float32: 100 MB
TENSOR_1MIB_SHAPE = (256, 1024)        # float32: 1 MiB
IMPORT_TOKEN = b"bench-token"
STOP = b"STOP"                         # not a valid message: every echo mode ends its loop on it


@dataclasses.dataclass(frozen=True)
class Plan:
    codec_target_s: float     # wall time of one repeat of one (message, operation)
    codec_repeats: int
    small_iters: int
    small_warmup: int
    large_iters: int
    large_warmup: int
    imports: int


FULL = Plan(codec_target_s=0.02, codec_repeats=5, small_iters=5000, small_warmup=500,
            large_iters=500, large_warmup=50, imports=50)
QUICK = Plan(codec_target_s=0.002, codec_repeats=5, small_iters=600, small_warmup=100,
             large_iters=60, large_warmup=10, imports=15)


# ================================================================ sample messages

def _backbone_info() -> M.BackboneInfo:
    return M.BackboneInfo(
        name="minilm", model_type="bert", hidden=384, layers=6, heads=12, intermediate=1536,
        vocab=30522, max_positions=512, dtype="float32",
        tokenizer="/var/lib/fmplex/backbones/minilm/tokenizer.json", region_bytes=90_868_224,
        checksum="3f2a9c0d5e7b41a8c6d2e0f9b1a7c3d5")


def _extension() -> M.ExtensionSpec:
    lora = [M.LoraEntry(layer=i, module=m, rank=8, scale=2.0)
            for i in range(6) for m in (M.Module.QUERY, M.Module.VALUE)]
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
                                endpoint="ipc:///run/fmplex/tenants/1000/sentiment.sock")),
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
        return np.zeros((4,) * max(1, min(spec.max_ndim, 2)), F.WIRE_DTYPES[spec.dtypes[0]])
    if isinstance(spec, F.Struct):
        return _auto_instance(spec.cls)
    raise TypeError(f"no sample value for {type(spec).__name__}")


def _auto_instance(cls):
    return cls(**{name: _auto_value(spec) for name, spec, required in F.schema_fields(cls)
                  if required})


# ================================================================ 1. codec

def _loop_encode(msg, n):
    enc = codec.encode
    t0 = perf_ns()
    for _ in repeat(None, n):
        enc(msg)
    return perf_ns() - t0


def _loop_decode(frames, n):
    dec = codec.decode
    t0 = perf_ns()
    for _ in repeat(None, n):
        dec(frames)
    return perf_ns() - t0


def _loop_both(msg, n):
    enc, dec = codec.encode, codec.decode
    t0 = perf_ns()
    for _ in repeat(None, n):
        dec(enc(msg))
    return perf_ns() - t0


def _time_us(loop, arg, plan: Plan) -> tuple[float, float, int]:
    """(median, min) over plan.codec_repeats of the mean time per call in us, and N per repeat
    (calibrated so that one repeat lasts about plan.codec_target_s). The min is the steadier
    figure on a busy host; the median is the headline."""
    probe_n = 20
    per_call_ns = max(loop(arg, probe_n) / probe_n, 50.0)
    n = int(min(max(plan.codec_target_s * 1e9 / per_call_ns, 20), 200_000))
    loop(arg, max(n // 10, 5))                                   # warm-up
    runs = [loop(arg, n) / n / 1e3 for _ in range(plan.codec_repeats)]
    return statistics.median(runs), min(runs), n


def bench_codec(plan: Plan) -> list[dict]:
    rows = []
    for label, msg in sample_messages():
        frames = codec.encode(msg)
        back = codec.decode(frames)
        if not _same(back, msg):
            raise AssertionError(f"{label}: codec round trip changed the message")
        enc_us, enc_min, n = _time_us(_loop_encode, msg, plan)
        dec_us, dec_min, _ = _time_us(_loop_decode, frames, plan)
        both_us, both_min, _ = _time_us(_loop_both, msg, plan)
        rows.append({"message": label, "type": msg.TYPE, "frames": len(frames),
                     "header_bytes": len(frames[0]),
                     "tensor_bytes": sum(memoryview(f).nbytes for f in frames[1:]),
                     "iterations": n, "repeats": plan.codec_repeats,
                     "encode_us": enc_us, "decode_us": dec_us, "encode_decode_us": both_us,
                     "encode_min_us": enc_min, "decode_min_us": dec_min,
                     "encode_decode_min_us": both_min})
    return rows


def _same(a, b) -> bool:
    """Message equality where numpy arrays compare by dtype, shape and content."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ================================================================ child processes

def _die_with_parent(parent_pid: int) -> None:
    """Children get SIGTERM when the benchmark dies, whatever way it dies (Linux prctl)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        sys.exit(0)


class Child:
    """A child process running this file with --child ...; killed in close() whatever happened."""

    def __init__(self, *args: str, pass_fds: tuple[int, ...] = ()):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", *args,
             "--parent-pid", str(os.getpid())],
            stdout=subprocess.PIPE, text=True, cwd=_ROOT, pass_fds=pass_fds)

    def wait_line(self, prefix: str, timeout_s: float = 30.0) -> str:
        """The child's next stdout line, which must start with `prefix`."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                raise TimeoutError(f"child sent no {prefix!r} within {timeout_s}s")
        line = self.proc.stdout.readline()
        if not line.startswith(prefix):
            raise RuntimeError(f"child said {line!r} (exit status {self.proc.poll()}), "
                               f"expected {prefix!r}")
        return line[len(prefix):].strip()

    def close(self, grace_s: float = 5.0) -> None:
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            self.proc.stdout.close()


# ---------------------------------------------------------------- echo peer (ROUTER)

def child_echo(mode: str, address: str) -> None:
    """Echo every message back to its sender until a STOP frame (or 60 s of silence).

    raw       frames back as received, no codec (transport cost only)
    codec     ipc.transport.recv_sync + decode, ipc.transport.send (the library's sync path)
    zerocopy  recv copy=False, decode to views, encode, send copy=False
    copied    recv copy=True (bytes), decode + copy the tensor, encode, send copy=True
    aio       the codec path on zmq.asyncio + uvloop (ipc.aio.run)
    """
    if mode == "aio":
        aio.run(_echo_aio(address))
        return
    ctx = zmq.Context()
    sock = transport.router(ctx, address)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    print("READY", flush=True)
    try:
        if mode == "raw":
            while True:
                frames = sock.recv_multipart()
                if frames[1] == STOP:
                    break
                sock.send_multipart(frames)
        elif mode == "codec":
            while True:
                env = transport.recv_sync(sock, True)
                transport.send(sock, env.decode(), env.identity)
        elif mode == "zerocopy":
            while True:
                frames = sock.recv_multipart(copy=False)
                msg = codec.decode(frames[1:])
                sock.send_multipart([frames[0], *codec.encode(msg)], copy=False)
        elif mode == "copied":
            while True:
                frames = sock.recv_multipart(copy=True)
                msg = codec.decode(frames[1:])
                msg = dataclasses.replace(msg, data=msg.data.copy())
                sock.send_multipart([frames[0], *codec.encode(msg)], copy=True)
        else:
            raise ValueError(f"unknown echo mode {mode!r}")
    except ProtocolError:       # STOP is not a message: the clean way out of the codec modes
        pass
    except zmq.Again:           # the parent went silent
        pass
    finally:
        sock.close()
        ctx.term()


def child_unix_echo(fd: int) -> None:
    """Echo datagrams on an inherited AF_UNIX SOCK_SEQPACKET socket until an empty one (or EOF):
    the kernel + process-wakeup floor of a round trip, with no ZeroMQ I/O threads in between."""
    sock = socket.socket(fileno=fd)
    print("READY", flush=True)
    try:
        while True:
            data = sock.recv(65536)
            if not data or data == STOP:
                break
            sock.send(data)
    finally:
        sock.close()


async def _echo_aio(address: str) -> None:
    ctx = zmq.asyncio.Context()
    sock = transport.router(ctx, address)
    print("READY", flush=True)
    try:
        while True:
            env = await transport.recv(sock, True)
            transport.send(sock, env.decode(), env.identity)
    except ProtocolError:
        pass
    finally:
        sock.close()
        ctx.term()


class EchoPeer:
    """An echo child and a connected DEALER (sync or asyncio) to it."""

    def __init__(self, mode: str, address: str, ctx: zmq.Context):
        self.address = address
        self.child = Child("echo", mode, self.address)
        self.sock = None
        try:
            self.child.wait_line("READY")
            self.sock = transport.dealer(ctx, self.address)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            if self.sock is not None:
                self.sock.send(STOP, zmq.NOBLOCK)
                self.sock.close(linger=2000)     # let STOP leave (the sockets' LINGER is 0)
        except zmq.ZMQError:
            pass
        finally:
            self.child.close()


# ================================================================ 2. round trips

def _stats_us(samples_ns, cpu_ns: int) -> dict:
    """Latency percentiles, plus the parent process's CPU time per round trip (its zmq I/O thread
    included): a figure that host load disturbs much less than the latencies."""
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"n": int(a.size), "parent_cpu_us": cpu_ns / a.size / 1e3,
            "p50_us": float(np.percentile(a, 50)), "p90_us": float(np.percentile(a, 90)),
            "p99_us": float(np.percentile(a, 99)),
            "mean_us": float(a.mean()), "min_us": float(a.min()), "max_us": float(a.max())}


def _rt_raw(sock, msg, n):
    frames = codec.encode(msg)          # encoded once: this row is the transport alone
    send, recv, out, reply = sock.send_multipart, sock.recv_multipart, [0] * n, None
    for i in range(n):
        t0 = perf_ns()
        send(frames)
        reply = recv()
        out[i] = perf_ns() - t0
    return out, codec.decode(reply)


def _rt_codec(sock, msg, n):
    send, recv, out, reply = transport.send, transport.recv_sync, [0] * n, None
    for i in range(n):
        t0 = perf_ns()
        send(sock, msg)
        reply = recv(sock, False).decode()
        out[i] = perf_ns() - t0
    return out, reply


def _rt_zerocopy(sock, msg, n):
    enc, dec, out, reply = codec.encode, codec.decode, [0] * n, None
    send, recv = sock.send_multipart, sock.recv_multipart
    for i in range(n):
        t0 = perf_ns()
        send(enc(msg), copy=False)
        reply = dec(recv(copy=False))
        out[i] = perf_ns() - t0
    return out, reply


def _rt_copied(sock, msg, n):
    enc, dec, out, reply = codec.encode, codec.decode, [0] * n, None
    send, recv, replace = sock.send_multipart, sock.recv_multipart, dataclasses.replace
    for i in range(n):
        t0 = perf_ns()
        send(enc(msg), copy=True)
        reply = dec(recv(copy=True))
        reply = replace(reply, data=reply.data.copy())
        out[i] = perf_ns() - t0
    return out, reply


def round_trip(name: str, mode: str, loop, msg, iters: int, warmup: int, run_dir: str,
               ctx) -> dict:
    """`loop` (a sync DEALER here) against a fresh echo child in `mode` (see child_echo)."""
    peer = EchoPeer(mode, f"ipc://{run_dir}/{name}.sock", ctx)
    try:
        peer.sock.setsockopt(zmq.RCVTIMEO, 10_000)       # a dead peer fails the run, not hangs it
        loop(peer.sock, msg, warmup)
        cpu0 = time.process_time_ns()
        samples, reply = loop(peer.sock, msg, iters)
        cpu = time.process_time_ns() - cpu0
    finally:
        peer.close()
    if not _same(reply, msg):
        raise AssertionError(f"{mode}: the echoed message differs from the one sent")
    return _stats_us(samples, cpu)


def round_trip_unix(msg, iters: int, warmup: int) -> dict:
    """The same bytes as the small raw row over a bare AF_UNIX socketpair (no ZeroMQ)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = None
    try:
        child = Child("unix", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        theirs.close()
        child.wait_line("READY")
        ours.settimeout(10)
        payload = codec.encode(msg)[0]

        def loop(n):
            send, recv, out, reply = ours.send, ours.recv, [0] * n, None
            for i in range(n):
                t0 = perf_ns()
                send(payload)
                reply = recv(65536)
                out[i] = perf_ns() - t0
            return out, reply
        loop(warmup)
        cpu0 = time.process_time_ns()
        samples, reply = loop(iters)
        cpu = time.process_time_ns() - cpu0
        ours.send(STOP)
    finally:
        ours.close()
        theirs.close()
        if child is not None:
            child.close()
    if codec.decode([reply]) != msg:
        raise AssertionError("unix: the echoed message differs from the one sent")
    return _stats_us(samples, cpu)


def round_trip_aio(name: str, peer_mode: str, msg, iters: int, warmup: int, run_dir: str) -> dict:
    """The codec round trip from a zmq.asyncio DEALER on uvloop (ipc.aio.run); the peer is the
    sync codec echo (peer_mode="codec") or the asyncio one (peer_mode="aio")."""
    address = f"ipc://{run_dir}/{name}.sock"
    child = Child("echo", peer_mode, address)

    async def main():
        actx = zmq.asyncio.Context()
        sock = transport.dealer(actx, address)
        try:
            async def loop(n):
                send, recv, out, reply = transport.send, transport.recv, [0] * n, None
                for i in range(n):
                    t0 = perf_ns()
                    send(sock, msg)
                    reply = (await recv(sock, False)).decode()
                    out[i] = perf_ns() - t0
                return out, reply
            async with asyncio.timeout(30):      # a dead peer fails the run, not hangs it
                await loop(warmup)
            cpu0 = time.process_time_ns()
            async with asyncio.timeout(120):
                samples, reply = await loop(iters)
            return samples, reply, time.process_time_ns() - cpu0
        finally:
            zmq.Socket.send(sock, STOP, zmq.NOBLOCK)     # the sync send: no future to await
            sock.close(linger=2000)
            actx.term()

    try:
        child.wait_line("READY")
        samples, reply, cpu = aio.run(main())
    finally:
        child.close()
    if not _same(reply, msg):
        raise AssertionError("aio: the echoed message differs from the one sent")
    return _stats_us(samples, cpu)


def bench_round_trips(plan: Plan, run_dir: str) -> dict:
    small = M.Heartbeat(epoch=987654321, seq=12345)
    big = M.Result(epoch=555, ref=1, version=3, output=M.Output.TOKENS,
                   data=np.random.default_rng(1).standard_normal(TENSOR_1MIB_SHAPE,
                                                                 dtype=np.float32))
    ctx = zmq.Context()
    s, sw, b, bw = plan.small_iters, plan.small_warmup, plan.large_iters, plan.large_warmup
    try:
        out = {
            "small_unix": round_trip_unix(small, s, sw),
            "small_raw": round_trip("small_raw", "raw", _rt_raw, small, s, sw, run_dir, ctx),
            "small_codec": round_trip("small_codec", "codec", _rt_codec, small, s, sw, run_dir,
                                      ctx),
            "small_aio_parent": round_trip_aio("small_aio_parent", "codec", small, s, sw, run_dir),
            "small_aio_both": round_trip_aio("small_aio_both", "aio", small, s, sw, run_dir),
            "large_zerocopy": round_trip("large_zerocopy", "zerocopy", _rt_zerocopy, big, b, bw,
                                         run_dir, ctx),
            "large_copied": round_trip("large_copied", "copied", _rt_copied, big, b, bw, run_dir,
                                       ctx),
            "large_transport": round_trip("large_transport", "codec", _rt_codec, big, b, bw,
                                          run_dir, ctx),
        }
    finally:
        ctx.term()
    for k in out:
        out[k]["message_bytes"] = sum(memoryview(f).nbytes for f in
                                      codec.encode(small if k.startswith("small") else big))
    return out


# ================================================================ 3. 100 MB import

def child_import(path: str, imports: int) -> None:
    """Import the backbone region `imports` times over the handle plane (timed), then once more to
    measure RSS/PSS before, after mapping and after reading every page. Prints RESULT <json>."""
    import psutil
    from ipc.handles import HandleClient
    from ipc.shm import MappedRegion

    proc = psutil.Process()
    allowed = frozenset({M.RegionsGranted, M.Error})
    client = HandleClient(path)
    ref = 0

    def import_once():
        nonlocal ref
        ref += 1
        t0 = perf_ns()
        reply, fds = client.request(M.OpenRegions(ref=ref, token=IMPORT_TOKEN), allowed)
        t1 = perf_ns()
        if not isinstance(reply, M.RegionsGranted):
            raise RuntimeError(f"import refused: {reply}")
        region = MappedRegion(fds[0], reply.backbone.size)
        t2 = perf_ns()
        view = region.array(reply.backbone.entries[0])
        t3 = perf_ns()
        for fd in fds:        # mmap holds its own duplicate of the fd
            os.close(fd)
        return region, view, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)

    def mem():
        info = proc.memory_full_info()
        return {"rss": info.rss, "pss": getattr(info, "pss", None), "uss": info.uss}

    try:
        times = []
        for _ in range(imports):
            region, view, t = import_once()
            times.append(t)
            del view
            region.close()
        before = mem()
        region, view, _ = import_once()
        after_map = mem()
        total = float(view.sum(dtype=np.float64))      # reads every page of the region
        after_touch = mem()
        warm = times[1:] or times                      # the first import is reported alone
        result = {
            "imports": imports,
            "first_us": times[0][3] / 1e3,
            "median_us": statistics.median(t[3] for t in warm) / 1e3,
            "min_us": min(t[3] for t in warm) / 1e3,
            "median_request_us": statistics.median(t[0] for t in warm) / 1e3,
            "median_mmap_us": statistics.median(t[1] for t in warm) / 1e3,
            "median_view_us": statistics.median(t[2] for t in warm) / 1e3,
            "region_bytes": region.size, "view_shape": list(view.shape),
            "view_dtype": str(view.dtype), "view_readonly": not view.flags.writeable,
            "sum": total, "mem_before": before, "mem_after_map": after_map,
            "mem_after_touch": after_touch,
        }
        del view
        region.close()
    finally:
        client.close()
    print("RESULT " + json.dumps(result), flush=True)


class HandlePlaneThread:
    """A real ipc.handles.HandleServer on uvloop in a thread, granting the backbone region and a
    slot region by SCM_RIGHTS to whoever presents IMPORT_TOKEN."""

    def __init__(self, path: str, backbone_fd: int, manifest: M.Manifest, slot_fd: int,
                 slot_size: int):
        self.path = path
        self._grant = (backbone_fd, manifest, slot_fd, slot_size)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="handle-plane", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"handle plane did not start: {self._error!r}")

    def _handler(self, msg, creds, conn_id):
        backbone_fd, manifest, slot_fd, slot_size = self._grant
        if not isinstance(msg, M.OpenRegions) or msg.token != IMPORT_TOKEN:
            raise FmplexError(ErrorCode.UNAUTHORIZED, "bad token")
        return (M.RegionsGranted(ref=msg.ref, backbone=manifest, slot_size=slot_size,
                                 slot_generation=1), [backbone_fd, slot_fd])

    def _run(self) -> None:
        from ipc.handles import HandleServer

        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            server = HandleServer(self.path, self._handler, lambda conn_id, creds: None,
                                  allowed=frozenset({M.OpenRegions}), mode=0o600)
            server.start()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                server.close()
        try:
            aio.run(main())
        except BaseException as e:   # reported by __init__ or close()
            self._error = e
            self._ready.set()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:     # loop already closed
                pass
        self._thread.join(10)


def bench_import(plan: Plan, run_dir: str) -> dict:
    from ipc.shm import create_region, export_tensors

    weights = np.ones(REGION_ELEMS, np.float32)
    t0 = perf_ns()
    fd, manifest = export_tensors("bench-backbone", {"weight": weights})
    export_s = (perf_ns() - t0) / 1e9
    del weights
    slot_size = 630_784
    slot_fd = create_region("bench-slot", slot_size)
    server = child = None
    try:
        server = HandlePlaneThread(os.path.join(run_dir, "handles.sock"), fd, manifest, slot_fd,
                                   slot_size)
        child = Child("import", server.path, "--imports", str(plan.imports))
        result = json.loads(child.wait_line("RESULT ", timeout_s=120))
    finally:
        if child is not None:
            child.close()
        if server is not None:
            server.close()
        os.close(fd)
        os.close(slot_fd)
    if result["sum"] != float(REGION_ELEMS):
        raise AssertionError(f"imported region sums to {result['sum']}, expected {REGION_ELEMS}")
    mb = 1e6
    b, m, t = result["mem_before"], result["mem_after_map"], result["mem_after_touch"]
    result.update({
        "export_s": export_s,
        "rss_growth_mb": (m["rss"] - b["rss"]) / mb,
        "rss_growth_touched_mb": (t["rss"] - b["rss"]) / mb,
        "pss_growth_mb": None if b["pss"] is None else (m["pss"] - b["pss"]) / mb,
        "pss_growth_touched_mb": None if b["pss"] is None else (t["pss"] - b["pss"]) / mb,
    })
    return result


# ================================================================ report

def goals(rt: dict, imp: dict) -> list[dict]:
    zc, cp = rt["large_zerocopy"]["p50_us"], rt["large_copied"]["p50_us"]
    return [
        {"goal": f"small ipc round trip p50 <= {GOAL_SMALL_P50_US:g} us",
         "value": rt["small_codec"]["p50_us"],
         "pass": rt["small_codec"]["p50_us"] <= GOAL_SMALL_P50_US},
        {"goal": "1 MiB zero-copy round trip faster than copied (p50)",
         "value": zc, "pass": zc < cp},
        {"goal": f"import of 100 MB <= {GOAL_IMPORT_US:g} us (median)",
         "value": imp["median_us"], "pass": imp["median_us"] <= GOAL_IMPORT_US},
        {"goal": f"RSS growth of the import < {GOAL_IMPORT_RSS_MB:g} MB",
         "value": imp["rss_growth_mb"], "pass": imp["rss_growth_mb"] < GOAL_IMPORT_RSS_MB},
    ]


def codec_table(rows: list[dict]) -> str:
    out = ["| message | frames | header B | tensor B | encode us | decode us | enc+dec us "
           "| enc+dec min us |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['message']} | {r['frames']} | {r['header_bytes']} | {r['tensor_bytes']} "
                   f"| {r['encode_us']:.2f} | {r['decode_us']:.2f} | {r['encode_decode_us']:.2f} "
                   f"| {r['encode_decode_min_us']:.2f} |")
    return "\n".join(out)


def summary_table(codec_rows: list[dict], rt: dict, imp: dict, gl: list[dict]) -> str:
    verdict = {g["goal"]: ("PASS" if g["pass"] else "FAIL") for g in gl}
    by_name = {r["message"]: r for r in codec_rows}

    def rtrow(label, key, goal=""):
        r = rt[key]
        v = (f"p50 {r['p50_us']:.1f} / p99 {r['p99_us']:.1f} us "
             f"(parent CPU {r['parent_cpu_us']:.1f})")
        return f"| {label} | {v} | {goal} | {verdict.get(goal, '')} |"

    g = [x["goal"] for x in gl]
    hb, res = by_name["Heartbeat"], by_name["Result(1 MiB)"]
    lines = [
        "| measurement | value | goal | result |", "|---|---|---|---|",
        f"| codec Heartbeat encode / decode / both | {hb['encode_us']:.2f} / {hb['decode_us']:.2f} "
        f"/ {hb['encode_decode_us']:.2f} us | | |",
        f"| codec Result(1 MiB) encode / decode / both | {res['encode_us']:.2f} / "
        f"{res['decode_us']:.2f} / {res['encode_decode_us']:.2f} us | | |",
        rtrow("AF_UNIX socketpair round trip, same bytes, no zmq (floor)", "small_unix"),
        rtrow("ipc:// round trip, small, raw zmq (no codec)", "small_raw"),
        rtrow("ipc:// round trip, small (Heartbeat), codec, sync", "small_codec", g[0]),
        rtrow("ipc:// round trip, small, codec, asyncio+uvloop parent / sync echo",
              "small_aio_parent"),
        rtrow("ipc:// round trip, small, codec, asyncio+uvloop both sides", "small_aio_both"),
        rtrow("ipc:// round trip, 1 MiB Result, zero-copy", "large_zerocopy", g[1]),
        rtrow("ipc:// round trip, 1 MiB Result, copied (naive)", "large_copied"),
        rtrow("ipc:// round trip, 1 MiB Result, ipc.transport.send/recv_sync (DEALER send copies)",
              "large_transport"),
        f"| import 100 MB region (handle plane + mmap + view), median of {imp['imports'] - 1} "
        f"after the first | {imp['median_us']:.1f} us (first {imp['first_us']:.1f}, "
        f"min {imp['min_us']:.1f}; view read-only: {'yes' if imp['view_readonly'] else 'NO'}) "
        f"| {g[2]} | {verdict[g[2]]} |",
        f"| ... of which fd request / mmap / numpy view | {imp['median_request_us']:.1f} / "
        f"{imp['median_mmap_us']:.1f} / {imp['median_view_us']:.1f} us | | |",
        f"| RSS growth after import | {imp['rss_growth_mb']:.2f} MB | {g[3]} | {verdict[g[3]]} |",
    ]
    def mb(v):
        return "n/a" if v is None else f"{v:.2f} MB"

    lines += [
        f"| PSS growth after import | {mb(imp['pss_growth_mb'])} | | |",
        f"| RSS / PSS growth after reading every page (contrast) | "
        f"{mb(imp['rss_growth_touched_mb'])} / {mb(imp['pss_growth_touched_mb'])} | | |",
    ]
    return "\n".join(lines)


def meta(plan: Plan, quick: bool) -> dict:
    return {"quick": quick, "plan": dataclasses.asdict(plan), "python": sys.version.split()[0],
            "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "numpy": np.__version__, "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version)),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def loadavg() -> float:
    """1-minute load average: other work on the host inflates every latency here (read it with
    the cpu count)."""
    return os.getloadavg()[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (well under 30 s)")
    ap.add_argument("--out", help="directory for ipc.json (default: a new temporary directory)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--imports", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        _die_with_parent(args.parent_pid)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
        role, *rest = args.child
        if role == "echo":
            child_echo(*rest)
        elif role == "unix":
            child_unix_echo(int(rest[0]))
        elif role == "import":
            child_import(rest[0], args.imports)
        else:
            raise SystemExit(f"unknown child role {role!r}")
        return 0

    plan = QUICK if args.quick else FULL
    out_dir = args.out or tempfile.mkdtemp(prefix="fmplex-bench-ipc-")
    os.makedirs(out_dir, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="fmplex-b-")      # sockets; short path for ipc://
    t_start, load_start = time.monotonic(), loadavg()
    try:
        print(f"codec: {len(M.ALL_MESSAGES)} message classes ...", file=sys.stderr, flush=True)
        codec_rows = bench_codec(plan)
        print("round trips ...", file=sys.stderr, flush=True)
        rt = bench_round_trips(plan, run_dir)
        print("100 MB import ...", file=sys.stderr, flush=True)
        imp = bench_import(plan, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    gl = goals(rt, imp)
    report = {"meta": {**meta(plan, args.quick), "loadavg_start": load_start,
                       "loadavg_end": loadavg()},
              "codec": codec_rows, "round_trip": rt, "import": imp, "goals": gl,
              "elapsed_s": time.monotonic() - t_start}
    path = os.path.join(out_dir, "ipc.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n## codec, mean per call (median of {plan.codec_repeats} repeats; N per row in "
          f"ipc.json)\n")
    print(codec_table(codec_rows))
    m = report["meta"]
    print(f"\nwrote {path} ({report['elapsed_s']:.1f} s, {m['cpus']} CPUs, load average "
          f"{m['loadavg_start']:.2f} -> {m['loadavg_end']:.2f}"
          f"{', --quick' if args.quick else ''})\n")
    print("## summary\n")
    print(summary_table(codec_rows, rt, imp, gl))
    return 0


if __name__ == "__main__":
    sys.exit(main())

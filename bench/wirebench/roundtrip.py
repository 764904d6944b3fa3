"""2. ipc:// round trips between two processes: a small message through raw zmq, the codec (sync
and asyncio+uvloop), a bare AF_UNIX floor, and a 1 MiB tensor zero-copy vs copied."""
from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

import numpy as np
import zmq
import zmq.asyncio

from ipc import aio, codec, transport
from ipc import messages as M

from bench.wirebench.children import Child, EchoPeer
from bench.wirebench.plan import STOP, TENSOR_1MIB_SHAPE, Plan, perf_ns
from bench.wirebench.samples import same_message

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
    if not same_message(reply, msg):
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
    if not same_message(reply, msg):
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

"""ZeroMQ transport over real ipc:// sockets: messages, ROUTER_MANDATORY (PeerGone / PeerBusy),
application liveness, epochs, ZAP authentication by peer uid, and MAXMSGSIZE.

Waits are bounded polls on sockets, socket monitors and pipes; nothing sleeps to synchronize.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ipc import aio, codec, transport, zap
from ipc.addresses import socket_path
from ipc.errors import ErrorCode, ProtocolError
from ipc.messages import Error, Heartbeat, Hello, Info, Ok, Output, Result, Role, Submit
from ipc.transport import Liveness, PeerBusy, PeerGone

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 10.0
NOBODY = 65534


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture
def run_dir():
    """A short directory for ipc:// paths (< 107 bytes), traversable by a dropped-privilege child."""
    d = tempfile.mkdtemp(prefix="fmt", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def spawn():
    """Start `python -c code args...` children; each is SIGKILLed (if alive) and reaped at the end."""
    procs: list[subprocess.Popen] = []

    def start(code: str, *args) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT_S)


def addr(run_dir: str, name: str = "r.sock") -> str:
    return f"ipc://{run_dir}/{name}"


def recv_within(sock: zmq.Socket, router_side: bool, timeout_s: float = WAIT_S) -> transport.Envelope:
    assert sock.poll(int(timeout_s * 1000)), f"nothing received within {timeout_s}s"
    return transport.recv_sync(sock, router_side)


def wait_event(monitor: zmq.Socket, event: int, timeout_s: float = WAIT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and monitor.poll(int(left * 1000) + 1), f"no monitor event {event}"
        evt = recv_monitor_message(monitor)
        if evt["event"] == event:
            return evt


def submit(n: int = 6) -> Submit:
    return Submit(epoch=3, ref=11, output=Output.TOKENS, lengths=[n // 2, n - n // 2],
                  ids=np.arange(n, dtype=np.int32), type_ids=np.ones(n, dtype=np.int8))


HELLO_CHILD = """
import os, sys, zmq
from ipc import transport
from ipc.messages import Hello, Role
ctx = zmq.Context()
sock = transport.dealer(ctx, sys.argv[1])
transport.send(sock, Hello(ref=1, proto=2, role=Role.TASK, pid=os.getpid()))
sys.stdin.read()                 # stay connected until killed
"""

HEARTBEAT_CHILD = """
import sys, time, zmq
from ipc import transport
from ipc.messages import Heartbeat
ctx = zmq.Context()
sock = transport.dealer(ctx, sys.argv[1])
epoch, seq = int(sys.argv[2]), 0
while True:
    transport.send(sock, Heartbeat(epoch=epoch, seq=seq))
    seq += 1
    time.sleep(0.05)             # the heartbeat period (pacing, not synchronization)
"""

NOBODY_CHILD = """
import os, sys, zmq
from ipc import transport
from ipc.messages import Hello, Role
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
ctx = zmq.Context()
sock = transport.dealer(ctx, sys.argv[1])
transport.send(sock, Hello(ref=2, proto=2, role=Role.CLIENT, pid=os.getpid()))
sys.stdin.read()
"""


# ---------------------------------------------------------------- messages over sockets

def test_socket_options(ctx, run_dir):
    r = transport.router(ctx, addr(run_dir), hwm=17, max_msg_bytes=12345)
    d = transport.dealer(ctx, addr(run_dir), hwm=18)
    for sock, hwm, size in ((r, 17, 12345), (d, 18, transport.DEFAULT_MAX_MSG_BYTES)):
        assert sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.SNDHWM) == sock.getsockopt(zmq.RCVHWM) == hwm
        assert sock.getsockopt(zmq.MAXMSGSIZE) == size
    assert r.type == zmq.ROUTER and d.type == zmq.DEALER


def test_send_and_receive_messages(ctx, run_dir):
    r = transport.router(ctx, addr(run_dir))
    d = transport.dealer(ctx, addr(run_dir))
    sent = submit()
    transport.send(d, sent)
    env = recv_within(r, router_side=True)
    assert isinstance(env.identity, bytes) and env.identity
    assert len(env.frames) == 3                          # header + two tensor frames
    got = env.decode()
    assert isinstance(got, Submit) and (got.epoch, got.ref, got.lengths) == (3, 11, [3, 3])
    assert np.array_equal(got.ids, sent.ids) and got.ids.dtype == np.int32
    assert np.array_equal(got.type_ids, sent.type_ids) and got.type_ids.dtype == np.int8
    # Zero copy: the array is a read-only view of the received zmq frame.
    assert not got.ids.flags.writeable
    assert np.shares_memory(got.ids, np.frombuffer(env.frames[1].buffer, np.uint8))
    with pytest.raises(ProtocolError) as info:
        env.decode(allowed=frozenset({Hello}))
    assert info.value.code is ErrorCode.UNEXPECTED

    data = np.arange(12, dtype=np.float16).reshape(3, 4)
    transport.send(r, Result(epoch=3, ref=11, version=1, output=Output.TOKENS, data=data),
                   env.identity)
    back = recv_within(d, router_side=False)
    assert back.identity is None
    reply = back.decode()
    assert isinstance(reply, Result) and np.array_equal(reply.data, data)
    assert reply.data.dtype == np.float16


def test_malformed_message_is_received_and_can_be_answered(ctx, run_dir):
    r = transport.router(ctx, addr(run_dir))
    d = transport.dealer(ctx, addr(run_dir))
    d.send_multipart([b"\x82\xa4type\xa5hello\xa3ref\x07", b"stray"])   # hand-packed, 2 frames
    env = recv_within(r, router_side=True)
    with pytest.raises(ProtocolError) as info:
        env.decode()
    ref = codec.peek_ref(env.frames)
    assert ref == 7
    transport.send(r, Error(ref=ref, code=info.value.code, message=info.value.message), env.identity)
    err = recv_within(d, router_side=False).decode()
    assert isinstance(err, Error) and err.ref == 7 and err.code is ErrorCode.BAD_MESSAGE


def test_user_id_is_none_without_zap(ctx, run_dir):
    r = transport.router(ctx, addr(run_dir))
    d = transport.dealer(ctx, addr(run_dir))
    transport.send(d, Hello(ref=1, proto=2, role=Role.CLIENT))
    env = recv_within(r, router_side=True)
    assert env.user_id() is None and env.peer_uid() is None
    assert transport.Envelope(b"id", [b"copied bytes"]).user_id() is None


def test_request_matches_the_reply_by_ref(ctx, run_dir):
    r = transport.router(ctx, addr(run_dir))
    d = transport.dealer(ctx, addr(run_dir))

    def responder():
        env = recv_within(r, router_side=True)
        msg = env.decode()
        transport.send(r, Ok(ref=msg.ref + 1000, message="stale"), env.identity)  # skipped
        transport.send(r, Error(ref=msg.ref, code=ErrorCode.OVERLOADED, message="full"),
                       env.identity)

    t = threading.Thread(target=responder)
    t.start()
    try:
        reply = transport.request(d, Info(ref=5), timeout_s=WAIT_S)
    finally:
        t.join(WAIT_S)
    assert isinstance(reply, Error) and reply.ref == 5 and reply.code is ErrorCode.OVERLOADED


def test_request_times_out_without_a_reply(ctx, run_dir):
    transport.router(ctx, addr(run_dir))                  # bound, never answers
    d = transport.dealer(ctx, addr(run_dir))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        transport.request(d, Info(ref=1), timeout_s=0.2)
    assert 0.2 <= time.monotonic() - t0 < WAIT_S


# ---------------------------------------------------------------- ROUTER_MANDATORY

def test_send_to_an_identity_that_never_connected_raises_peer_gone(ctx, run_dir):
    r = transport.router(ctx, addr(run_dir))
    with pytest.raises(PeerGone) as info:
        transport.send(r, Ok(ref=1), b"\x00nobody")
    assert info.value.code is ErrorCode.TASK_UNAVAILABLE
    # A failed send leaves the socket usable (no half-sent multipart message).
    d = transport.dealer(ctx, addr(run_dir))
    transport.send(d, Hello(ref=1, proto=2, role=Role.TASK))
    env = recv_within(r, router_side=True)
    transport.send(r, Ok(ref=1), env.identity)
    assert recv_within(d, router_side=False).decode() == Ok(ref=1)


def test_send_to_a_peer_whose_process_died_raises_peer_gone(ctx, run_dir, spawn):
    r = transport.router(ctx, addr(run_dir))
    monitor = r.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        child = spawn(HELLO_CHILD, addr(run_dir))
        env = recv_within(r, router_side=True)
        hello = env.decode()
        assert isinstance(hello, Hello) and hello.pid == child.pid
        transport.send(r, Ok(ref=1), env.identity)        # alive: accepted

        child.kill()
        assert child.wait(timeout=WAIT_S) == -signal.SIGKILL
        wait_event(monitor, zmq.EVENT_DISCONNECTED)
        # libzmq reports the disconnect just before it tells the socket to drop the peer's pipe,
        # so the first send after the event may still be accepted (and dropped); poll lets the
        # socket process that command. It must turn into PeerGone promptly and stay that way.
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                transport.send(r, Ok(ref=2), env.identity)
            except PeerGone:
                break
            assert time.monotonic() < deadline, "send to a dead peer kept succeeding"
            r.poll(10)
        with pytest.raises(PeerGone):
            transport.send(r, Ok(ref=3), env.identity)
    finally:
        r.disable_monitor()
        monitor.close()


def test_send_to_a_peer_that_does_not_read_raises_peer_busy(ctx, run_dir):
    r = transport.router(ctx, addr(run_dir), hwm=1)
    d = transport.dealer(ctx, addr(run_dir), hwm=1)
    transport.send(d, Hello(ref=1, proto=2, role=Role.TASK))
    env = recv_within(r, router_side=True)
    big = Result(epoch=1, ref=1, version=0, output=Output.POOLED,
                 data=np.zeros((256, 1024), np.float32))          # 1 MiB per message
    with pytest.raises(PeerBusy) as info:
        for _ in range(1000):                                      # kernel buffers fill quickly
            transport.send(r, big, env.identity)
    assert info.value.code is ErrorCode.OVERLOADED


# ---------------------------------------------------------------- liveness and epochs

def test_liveness_with_an_injected_clock():
    lv = Liveness(timeout_s=1.0)
    lv.seen("a", now=10.0)
    lv.seen("b", now=10.5)
    assert lv.expired(now=11.0) == []                  # exactly at the timeout: still alive
    assert lv.expired(now=11.2) == ["a"]
    assert lv.expired(now=11.2) == []                  # each expiry is reported once
    lv.seen("b", now=11.4)                             # a heartbeat refreshes
    assert lv.expired(now=12.3) == []
    assert lv.expired(now=12.41) == ["b"]
    lv.seen("c", now=0.0)
    lv.forget("c")
    lv.forget("never-seen")
    assert lv.expired(now=1e9) == []
    lv.seen("a", now=100.0)                            # an expired peer can come back
    lv.seen("d", now=100.0)
    assert sorted(lv.expired(now=102.0)) == ["a", "d"]


def test_liveness_detects_a_hung_peer_in_real_time(ctx, run_dir, spawn):
    r = transport.router(ctx, addr(run_dir))
    epoch = transport.new_epoch()
    child = spawn(HEARTBEAT_CHILD, addr(run_dir), epoch)
    lv = Liveness(timeout_s=0.3)
    identity, seqs = None, []
    while len(seqs) < 4:
        env = recv_within(r, router_side=True)
        beat = env.decode(allowed=frozenset({Heartbeat}))
        transport.check_epoch(beat.epoch, epoch)
        identity = env.identity
        lv.seen(identity)
        seqs.append(beat.seq)
        assert lv.expired() == []
    assert seqs == sorted(seqs)

    os.kill(child.pid, signal.SIGSTOP)                 # hung: alive, connected, silent
    stopped = time.monotonic()
    deadline = stopped + WAIT_S
    expired: list = []
    while not expired:
        assert time.monotonic() < deadline, "a silent peer was never reported"
        if r.poll(50):                                 # heartbeats already in flight still count
            env = transport.recv_sync(r, router_side=True)
            lv.seen(env.identity)
        expired = lv.expired()
    assert expired == [identity]
    assert time.monotonic() - stopped >= 0.3 - 0.1     # not before the timeout (one period of slack)


def test_epochs():
    epochs = {transport.new_epoch() for _ in range(1000)}
    assert len(epochs) == 1000
    assert all(type(e) is int and 1 <= e < 2**63 for e in epochs)
    transport.check_epoch(5, 5)
    with pytest.raises(ProtocolError) as info:
        transport.check_epoch(4, 5)
    assert info.value.code is ErrorCode.STALE_EPOCH


# ---------------------------------------------------------------- ZAP

def uid0_only(requests: list, seen: asyncio.Event):
    def decide(req: zap.ZapRequest):
        requests.append(req)
        seen.set()
        return str(req.ipc_uid) if req.ipc_uid == 0 else None    # fmplexd's User-Id: the uid
    return decide


async def wait_for_request(requests: list, seen: asyncio.Event, pred):
    async with asyncio.timeout(WAIT_S):
        while not any(pred(r) for r in requests):
            seen.clear()
            await seen.wait()


def test_zap_accepts_root_and_refuses_uid_65534(run_dir):
    if os.getuid() != 0:
        pytest.skip("needs root to switch a child to uid 65534")

    async def main():
        actx = zmq.asyncio.Context()
        sctx = zmq.Context()
        child = None
        requests, seen = [], asyncio.Event()
        server = zap.ZapServer(actx, uid0_only(requests, seen))
        server.start()
        try:
            r = transport.router(actx, addr(run_dir), zap_domain=b"fmplex")
            os.chmod(socket_path(addr(run_dir)), 0o666)   # reachable by any uid: ZAP decides

            child = subprocess.Popen([sys.executable, "-c", NOBODY_CHILD, addr(run_dir)], cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO)},
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
            await wait_for_request(requests, seen, lambda q: q.ipc_uid == NOBODY)
            refused = next(q for q in requests if q.ipc_uid == NOBODY)
            assert refused.domain == "fmplex" and refused.mechanism == "NULL"
            assert refused.address.endswith(f":{NOBODY}:{NOBODY}:{child.pid}")
            # Refused at the handshake: its Hello never arrives (a bounded wait, not a sleep).
            assert await r.poll(1000) == 0

            d = transport.dealer(sctx, addr(run_dir))
            transport.send(d, Hello(ref=1, proto=2, role=Role.TASK, pid=os.getpid()))
            env = await asyncio.wait_for(transport.recv(r, router_side=True), WAIT_S)
            assert env.decode() == Hello(ref=1, proto=2, role=Role.TASK, pid=os.getpid())
            assert env.user_id() == "0" and env.peer_uid() == 0
            assert any(q.ipc_uid == 0 and q.address.endswith(f":0:0:{os.getpid()}")
                       for q in requests)
            assert await r.poll(200) == 0              # and still nothing from the child
        finally:
            if child is not None:
                child.kill()
                child.communicate(timeout=WAIT_S)
            server.close()
            sctx.destroy(linger=0)
            actx.destroy(linger=0)

    aio.run(main())


def test_zap_policy_that_raises_refuses_the_connection(run_dir):
    async def main():
        actx = zmq.asyncio.Context()
        sctx = zmq.Context()
        calls = asyncio.Event()

        def broken(req):
            calls.set()
            raise RuntimeError("policy bug")

        server = zap.ZapServer(actx, broken)
        server.start()
        try:
            r = transport.router(actx, addr(run_dir), zap_domain=b"fmplex")
            d = transport.dealer(sctx, addr(run_dir))
            transport.send(d, Hello(ref=1, proto=2, role=Role.TASK))
            await asyncio.wait_for(calls.wait(), WAIT_S)
            assert await r.poll(500) == 0
        finally:
            server.close()
            sctx.destroy(linger=0)
            actx.destroy(linger=0)

    aio.run(main())


def test_zap_request_parsing():
    frames = [b"1.0", b"7", b"fmplex", b"localhost:1000:100:4242", b"", b"NULL"]
    req = zap.parse(frames)
    assert req == zap.ZapRequest("fmplex", "localhost:1000:100:4242", "NULL", ())
    assert req.ipc_uid == 1000 and req.curve_key is None
    curve = zap.parse([b"1.0", b"8", b"d", b"10.0.0.1", b"", b"CURVE", b"k" * 32])
    assert curve.ipc_uid is None and curve.curve_key == b"k" * 32
    assert zap.parse([b"2.0", b"1", b"d", b"a", b"", b"NULL"]) is None
    assert zap.parse([b"1.0", b"1", b"d"]) is None
    assert zap.parse([b"1.0", b"1", b"\xff", b"a", b"", b"NULL"]) is None


# ---------------------------------------------------------------- MAXMSGSIZE

def test_oversized_message_disconnects_the_sender_and_is_not_delivered(ctx, run_dir):
    r = transport.router(ctx, addr(run_dir), max_msg_bytes=4096)
    rmon = r.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    d = transport.dealer(ctx, addr(run_dir))
    dmon = d.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        too_big = submit(2048)                          # an 8 KiB ids frame
        assert too_big.ids.nbytes > 4096
        transport.send(d, too_big)
        wait_event(rmon, zmq.EVENT_DISCONNECTED)        # the router dropped the connection
        wait_event(dmon, zmq.EVENT_DISCONNECTED)        # and the dealer saw it go
        assert r.poll(0) == 0
        # The dealer reconnects; the next message is the first (and only) one delivered.
        transport.send(d, Heartbeat(epoch=1, seq=1))
        assert recv_within(r, router_side=True).decode() == Heartbeat(epoch=1, seq=1)
        assert r.poll(100) == 0
    finally:
        r.disable_monitor()
        d.disable_monitor()
        rmon.close()
        dmon.close()

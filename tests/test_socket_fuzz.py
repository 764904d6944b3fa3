"""Fuzzing every socket of a live fmplexd and a live task process while valid traffic keeps flowing
(the fuzzer, its oracle and checks are testkit/fuzz/sockets.py; its module doc lists them)."""
from __future__ import annotations

import os
import socket
import sys

import numpy as np
import pytest
import zmq

from ipc import codec
from ipc.messages import (PROTOCOL_VERSION, Commit, Committed, Deploy, Error, ExtensionSpec,
                          Health, Heartbeat, Hello, Infer, ListTasks, Ok, OpenRegions, Output,
                          PrepareUpdate, Register, Registered, RemoveTask, Role, Submit,
                          TaskCommand, TaskConfig, Unregister, UpdateReady)
from testkit.fuzz.mutations import edit_frames, edit_header
from testkit.fuzz.sockets import (CONTROL_MAX_FRAME, HANDLE_MAX_FDS, HANDLE_MAX_REQUEST,
                                  HEARTBEAT_CONFIG, IGNORED_REPLIES, MAX_HEADER, PROBE_BASE,
                                  PROBE_TYPE, REAL_TASK, Target, _short, check_campaign, fd_count,
                                  fd_links, frames_of, local_decode, pack, remove_fuzz_tasks,
                                  run_campaign, safe, settle)

# ------------------------------------------------------------------------ fixtures and tests

@pytest.fixture(scope="module")
def target(tiny_bert):
    from testkit.launch import Daemon, TaskProc, short_tmpdir, write_spec
    import shutil
    d = Daemon(tiny_bert, config=HEARTBEAT_CONFIG).start()
    specs = short_tmpdir("fmx-sfz-")
    task = TaskProc(write_spec(specs, REAL_TASK, 'pipeline = "text-embedding"'), d.run_dir)
    try:
        task.start()
        yield Target(d.run_dir, d.proc.pid, task.proc.pid,
                     f"ipc://{d.run_dir}/tenants/{os.getuid()}/{REAL_TASK}.sock")
    finally:
        task.stop()
        d.cleanup()
        shutil.rmtree(specs, ignore_errors=True)


def _seed(default: int) -> int:
    return int(os.environ.get("FMPLEX_FUZZ_SEED", default))


def test_every_socket_survives_fuzzing_under_valid_traffic(target):
    seed = _seed(20240601)
    print(f"socket fuzz seed {seed} (FMPLEX_FUZZ_SEED replays it)")
    out = run_campaign(target, n_per_socket=3000, seed=seed, warmup=300, chunk=1000)
    print({k: v for k, v in out.items() if k != "sockets"})
    check_campaign(out)


@pytest.mark.slow
def test_every_socket_survives_100k_inputs_each(target):
    seed = _seed(7)
    print(f"socket fuzz seed {seed} (FMPLEX_FUZZ_SEED replays it)")
    out = run_campaign(target, n_per_socket=100_000, seed=seed, warmup=3000,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    print({k: v for k, v in out.items() if k != "sockets"})
    check_campaign(out)


# -- hand-picked inputs: each socket answers each class of malformed input with its typed error

def _dealer(ctx, address):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


def _ask(sock, frames, timeout_s=20.0):
    """Send; the next reply that is not the daemon's own heartbeat or command."""
    sock.send_multipart(frames)
    while True:
        assert sock.poll(int(timeout_s * 1000)), f"no reply to {_short(frames)}"
        msg = codec.decode(sock.recv_multipart())
        if not isinstance(msg, IGNORED_REPLIES):
            return msg


HAND_PICKED = [   # (frames, code, ref) for every ZeroMQ socket
    ([b"\xc1"], "bad_frame", 0),
    ([b""], "bad_frame", 0),                                            # the nearest to 0 frames
    ([b"", pack({"type": "health", "ref": 5})], "bad_frame", 0),        # a REQ envelope
    ([b"\xdd\xff\xff\xff\xff\x01\x02"], "bad_frame", 0),                 # 2^32-1 items, 2 present
    ([b"\x82\xa4type\xa4info\xa3ref\xdb\xff\xff\xff\xff"], "bad_frame", 0),
    ([b"\x82\xa4type\xa4info\xa3ref\xdf\x00\x10\x00\x00"], "bad_frame", 0),   # 2^20-entry map
    ([pack({"type": "info", "ref": 6})] + [b""] * 69, "bad_frame", 6),  # 70 frames
    ([pack([1, 2])], "bad_message", 0),
    ([pack({"type": "no_such", "ref": 7})], "unknown_type", 7),
    ([b"\x81\xa4type\xdb" + (MAX_HEADER).to_bytes(4, "big") + b"y" * MAX_HEADER], "too_large", 0),
]


@pytest.mark.parametrize("kind", ["control", "tasks", "endpoint"])
def test_hand_picked_malformed_inputs_get_typed_errors(target, kind):
    address = {"control": f"ipc://{target.run_dir}/control.sock",
               "tasks": f"ipc://{target.run_dir}/tasks.sock", "endpoint": target.endpoint}[kind]
    other = {"control": frames_of(Infer(ref=8, texts=["x"])),
             "tasks": frames_of(ListTasks(ref=8)),
             "endpoint": frames_of(Hello(ref=8, proto=PROTOCOL_VERSION, role=Role.CLIENT))}[kind]
    cases = HAND_PICKED + [(other, "unexpected", 8)]
    if kind == "tasks":
        cases.append((frames_of(Submit(epoch=12345, ref=9, output=Output.POOLED, lengths=[1],
                                       ids=np.array([101], dtype="<i4"))), "stale_epoch", 9))
        cases.append((frames_of(Heartbeat(epoch=12345, seq=1)), "stale_epoch", 0))
    ctx = zmq.Context()
    try:
        sock = _dealer(ctx, address)
        for frames, code, ref in cases:
            got = _ask(sock, frames)
            assert isinstance(got, Error) and (got.code.value, got.ref) == (code, ref), (
                _short(frames), got)
    finally:
        ctx.destroy(linger=0)


def test_handle_plane_fds_past_the_limit_are_refused_and_not_leaked(target):
    path = os.path.join(target.run_dir, "handles.sock")
    pipes = [os.pipe() for _ in range(40)]
    pool = [fd for p in pipes for fd in p]
    before = fd_count(target.daemon_pid)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(20)
    s.connect(path)
    open_regions = frames_of(OpenRegions(ref=11, token=b"\x00" * 16))[0]
    cases = [
        (open_regions, pool[:1], "unexpected", 11),                 # valid request + 1 fd
        (open_regions, pool[:HANDLE_MAX_FDS], "unexpected", 11),    # exactly MAX_FDS
        (open_regions, pool[:HANDLE_MAX_FDS + 1], "too_large", 11),  # one past it
        (open_regions, pool[:64], "too_large", 11),
        (b"\xc1garbage", pool[:5], "bad_frame", 0),                 # fds + garbage
        (b"", pool[:3], "bad_frame", 0),                             # fds, no bytes
        (open_regions + b"\x00" * HANDLE_MAX_REQUEST, [], "too_large", 0),   # truncated: no ref
        (pack({"type": "info", "ref": 12}), [], "unexpected", 12),
        (open_regions, [], "unauthorized", 11),
    ]
    try:
        for _ in range(20):                                          # many rounds: a leak shows
            for data, fds, code, ref in cases:
                socket.send_fds(s, [data], fds)
                reply, got, _, _ = socket.recv_fds(s, 4 << 20, 8)
                assert not got
                msg = codec.decode([reply])
                assert isinstance(msg, Error) and (msg.code.value, msg.ref) == (code, ref), (
                    code, msg)
        s.send(b"")                                  # an empty datagram reads as EOF (§3.4 note)
        assert s.recv(16) == b""
    finally:
        s.close()
        for fd in pool:
            os.close(fd)
    from fmplex.client import Client
    with Client(target.run_dir, timeout_s=20) as c:
        assert settle(lambda: fd_count(target.daemon_pid) <= before, c), (
            before, fd_count(target.daemon_pid))
        assert c.control(Health(ref=c.ref())).live


def test_an_oversized_frame_drops_only_that_connection(target):
    ctx = zmq.Context()
    try:
        kept = _dealer(ctx, f"ipc://{target.run_dir}/control.sock")
        assert _ask(kept, frames_of(Health(ref=1))).live
        big = _dealer(ctx, f"ipc://{target.run_dir}/control.sock")
        big.send(b"\x81\xa4type\xdb" + (CONTROL_MAX_FRAME + 1).to_bytes(4, "big")
                 + b"z" * (CONTROL_MAX_FRAME + 1))
        assert not big.poll(500)                         # no reply: libzmq closed that connection
        reply = _ask(kept, frames_of(Health(ref=3)))     # the others are still served
        assert reply.ref == 3 and reply.live
        fresh = _dealer(ctx, f"ipc://{target.run_dir}/control.sock")
        assert _ask(fresh, frames_of(Health(ref=4))).live
    finally:
        ctx.destroy(linger=0)


# -- hypothesis on the control socket: mutated encodings of schema-derived messages, shrinkable

def test_hypothesis_mutations_on_the_control_socket(target):
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st
    from tests.test_codec_fuzz import FRAME_EDIT, HEADER_EDIT, MESSAGES

    ctx = zmq.Context()
    sock = _dealer(ctx, f"ipc://{target.run_dir}/control.sock")
    probes = iter(range(PROBE_BASE, PROBE_BASE + 10**9))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(MESSAGES, st.lists(HEADER_EDIT, max_size=4), st.lists(FRAME_EDIT, max_size=2))
    def one(msg, header_edits, frame_edits):
        frames = frames_of(msg)
        head = bytearray(frames[0])
        for e in header_edits:
            head = edit_header(head, *e)
        frames = [bytes(head)] + frames[1:]
        for e in frame_edits:
            frames = edit_frames(frames, *e)
        assume(frames and safe(frames, "control"))
        decoded, err = local_decode(frames, "control")
        assume(not isinstance(decoded, (Deploy, TaskCommand)))               # answered later
        assume(not (isinstance(decoded, Health) and decoded.wait_ms and decoded.name))
        probe = next(probes)
        sock.send_multipart(frames)
        sock.send(pack({"type": PROBE_TYPE, "ref": probe}))
        got = []
        while not got or getattr(got[-1], "ref", None) != probe:
            assert sock.poll(20_000), "the daemon stopped answering"
            got.append(codec.decode(sock.recv_multipart()))
        got.pop()
        if err is not None:
            assert len(got) == 1 and isinstance(got[0], Error), got
            assert (got[0].code, got[0].ref) == (err.code, codec.peek_ref(frames)), got
        else:
            assert len(got) == 1 and got[0].ref == decoded.ref, got

    try:
        one()
    finally:
        ctx.destroy(linger=0)
        from fmplex.client import Client
        with Client(target.run_dir, timeout_s=20) as c:
            remove_fuzz_tasks(c)
            assert c.infer(REAL_TASK, ["still serving"]).embeddings.shape == (1, 32)


@pytest.mark.parametrize("end", ["unregister", "reregister", "remove_task"])
def test_an_uncommitted_new_slot_is_freed_when_its_session_ends(target, end):
    """Regressions found by the fuzzer: a slot staged by PrepareUpdate (new layout) and never
    committed kept its memfd open in the daemon after unregister / re-register / remove_task; and
    a re-register over a session whose `register.pid` was 2^31 (allowed by the schema) crashed
    the liveness check (os.kill OverflowError -> `internal`)."""
    from fmplex.client import Client
    ctx = zmq.Context()
    with Client(target.run_dir, timeout_s=20) as c:
        run_slot_session(c, ctx, target, end)


def run_slot_session(c, ctx, target: Target, end: str) -> None:
    try:
        c.control(Health(ref=c.ref()))
        sock = _dealer(ctx, f"ipc://{target.run_dir}/tasks.sock")
        assert _ask(sock, frames_of(Hello(ref=0, proto=PROTOCOL_VERSION, role=Role.TASK))).TYPE == "welcome"
        base = fd_count(target.daemon_pid)            # with both connections open
        reg = _ask(sock, frames_of(Register(ref=1, proto=PROTOCOL_VERSION, task=TaskConfig(
            name="fzleak", owner_uid=os.getuid()), extension=ExtensionSpec(), pid=1 << 31)))
        assert isinstance(reg, Registered), reg
        assert isinstance(_ask(sock, frames_of(Commit(epoch=reg.epoch, ref=2, generation=1,
                                                      half=0))), Committed)
        ready = _ask(sock, frames_of(PrepareUpdate(epoch=reg.epoch, ref=3,
                                                   extension=ExtensionSpec(prompt_tokens=2))))
        assert isinstance(ready, UpdateReady) and ready.slot.generation == 2, ready
        if end == "unregister":
            assert isinstance(_ask(sock, frames_of(Unregister(epoch=reg.epoch, ref=4))), Ok)
        elif end == "reregister":
            again = _ask(sock, frames_of(Register(ref=5, proto=PROTOCOL_VERSION, task=TaskConfig(
                name="fzleak", owner_uid=os.getuid()), extension=ExtensionSpec())))
            assert isinstance(again, Registered), again
            assert isinstance(_ask(sock, frames_of(Unregister(epoch=again.epoch, ref=6))), Ok)
        else:
            c.control(RemoveTask(ref=c.ref(), name="fzleak"))
        assert settle(lambda: fd_count(target.daemon_pid) <= base, c, timeout_s=10), (
            base, [ln for ln in fd_links(target.daemon_pid).values() if "memfd:fmplex-slot" in ln])
    finally:
        ctx.destroy(linger=0)

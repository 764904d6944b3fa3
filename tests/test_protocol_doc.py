"""docs/protocol.md is enough to write a peer: these tests play a client, an operator and a task
process written from that document alone, with raw pyzmq + msgpack + AF_UNIX sockets against a real
fmplexd and a real task process. Nothing from ipc/, fmplexd/ or tasklets/ is imported for the
protocol; tests.helpers only starts and stops the real processes. Every wait is a poll with a timeout.
"""
import mmap
import os
import shutil
import socket
import time

import msgpack
import numpy as np
import pytest
import zmq

from testkit.launch import Daemon, TaskProc, short_tmpdir, write_spec

PROTO = 3                       # §8
HEARTBEAT_MS = 500              # the daemon below is configured with it (§10); generous, so that
LIVENESS_MS = 5000              # a loaded CI machine does not make peers declare each other dead
WAIT_MS = 10_000
U63 = 1 << 63
PROTOCOL_CODES = {"bad_frame", "bad_message", "unknown_type", "too_large", "version_mismatch",
                  "stale_epoch", "not_registered", "unexpected"}


def pack(**fields) -> bytes:
    """A header (§5.2): a MessagePack map with str keys, str and bin kept distinct."""
    return msgpack.packb(fields, use_bin_type=True)


def unpack(frame: bytes) -> dict:
    return msgpack.unpackb(frame, raw=False)


def tensor(frames: list[bytes], ref: dict, dtype: str) -> np.ndarray:
    """The out-of-band tensor a {dtype, shape, frame} reference names (§5.3): little-endian, C order."""
    assert set(ref) == {"dtype", "shape", "frame"} and ref["dtype"] == dtype
    buf = frames[ref["frame"]]
    wire = {"float32": "<f4", "int32": "<i4"}[dtype]
    assert len(buf) == np.dtype(wire).itemsize * int(np.prod(ref["shape"]))
    return np.frombuffer(buf, dtype=wire).reshape(ref["shape"])


class Dealer:
    """A DEALER peer of one of fmplex's ROUTER sockets (§3.2)."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.on_idle = None                  # called while waiting (a task sends heartbeats there)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout_ms: int = WAIT_MS) -> tuple[dict, list[bytes]]:
        """The next message: (header, all frames; frames[i] is tensor frame i)."""
        deadline = time.monotonic() + timeout_ms / 1e3
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no message within the timeout"
            if self.sock.poll(int(min(left, 0.05) * 1000) + 1):
                frames = self.sock.recv_multipart()
                return unpack(frames[0]), frames
            if self.on_idle is not None:
                self.on_idle()

    def reply_to(self, ref: int, timeout_ms: int = WAIT_MS, skip=("heartbeat",)) -> tuple[dict, list]:
        """Wait for the message answering `ref` (§5.6), passing over unrelated traffic."""
        while True:
            head, frames = self.recv(timeout_ms)
            if head.get("ref") == ref and head["type"] not in skip:
                return head, frames

    def request(self, *frames: bytes, timeout_ms: int = WAIT_MS) -> tuple[dict, list]:
        self.send(*frames)
        return self.reply_to(unpack(frames[0])["ref"], timeout_ms)

    def close(self) -> None:
        self.sock.close(linger=0)


def assert_error(head: dict, code: str, ref: int, admission: bool = False) -> None:
    """An error as §5/§6 say (with the admission figures of §13.5 when it answers a session
    request on the task plane)."""
    assert head["type"] == "error", head
    assert set(head) == {"type", "ref", "code", "message", "epoch"} | (
        {"room", "seen"} if admission else set()), head
    assert head["code"] == code and head["ref"] == ref, head
    assert isinstance(head["message"], str) and len(head["message"]) <= 4096


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def daemon(tiny_bert):
    d = Daemon(tiny_bert, config=f"heartbeat_ms = {HEARTBEAT_MS}\nliveness_ms = {LIVENESS_MS}").start()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def emb_task(daemon):
    specs = short_tmpdir("fmx-pdoc-")
    proc = TaskProc(write_spec(specs, "emb", 'pipeline = "text-embedding"'), daemon.run_dir)
    try:
        yield proc.start()
    finally:
        proc.stop()
        shutil.rmtree(specs, ignore_errors=True)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def control(ctx, daemon) -> Dealer:
    return Dealer(ctx, f"ipc://{daemon.run_dir}/control.sock")          # §2


def handle_plane(daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)           # §3.4
    s.settimeout(WAIT_MS / 1e3)                                         # a poll timeout per recv
    s.connect(os.path.join(daemon.run_dir, "handles.sock"))
    return s


def handle_request(s: socket.socket, datagram: bytes) -> tuple[dict, list[int]]:
    s.send(datagram)
    data, fds, flags, _ = socket.recv_fds(s, 4 << 20, 8)                # 4 MiB, room for fds
    assert data, "the daemon closed the handle plane"
    assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    return unpack(data), fds


# ---------------------------------------------------------------------------------- the client


def test_hello_gets_welcome_and_version_mismatch(ctx, daemon):
    c = control(ctx, daemon)
    head, frames = c.request(pack(type="hello", ref=1, proto=PROTO, role="client", pid=os.getpid()))
    assert len(frames) == 1
    assert set(head) == {"type", "ref", "proto", "epoch", "heartbeat_ms", "backbones"}
    assert head["type"] == "welcome" and head["ref"] == 1 and head["proto"] == PROTO
    assert 1 <= head["epoch"] < U63 and head["heartbeat_ms"] == HEARTBEAT_MS
    (bb,) = head["backbones"]
    assert set(bb) == {"name", "family", "model_type", "hidden", "layers", "heads", "intermediate",
                       "vocab", "max_positions", "dtype", "tokenizer", "region_bytes", "checksum",
                       "targets", "generation", "image", "series"}
    assert bb["family"] == "text-encoder"
    assert bb["generation"] is None and bb["image"] is None and bb["series"] is None   # nil
    assert {t["name"]: (t["path"], t["in_features"], t["out_features"]) for t in bb["targets"]}[
        "ffn_in"] == ("intermediate.dense", 32, 64)
    assert (bb["name"], bb["model_type"], bb["hidden"], bb["layers"]) == ("default", "bert", 32, 2)
    assert bb["dtype"] == "float32" and len(bb["checksum"]) == 32

    info, _ = c.request(pack(type="info", ref=2))                      # same incarnation epoch (§9)
    assert info["type"] == "info_reply" and info["epoch"] == head["epoch"]
    assert info["run_dir"] == daemon.run_dir

    bad, _ = c.request(pack(type="hello", ref=3, proto=PROTO + 1, role="client"))
    assert_error(bad, "version_mismatch", 3)
    assert bad["epoch"] == 0
    c.close()


def test_resolve_then_infer_on_the_task_endpoint(ctx, daemon, emb_task):
    c = control(ctx, daemon)
    ep, _ = c.request(pack(type="resolve", ref=10, name="emb"))
    assert ep["type"] == "endpoint" and ep["ref"] == 10 and ep["name"] == "emb"
    assert ep["address"] == f"ipc://{daemon.run_dir}/tenants/{os.getuid()}/emb.sock"
    assert ep["tcp_endpoint"] == "" and ep["server_key"] == ""

    task = Dealer(ctx, ep["address"])
    texts = ["hello world", "a second, longer sentence to embed"]
    head, frames = task.request(pack(type="infer", ref=11, texts=texts))
    assert head["type"] == "infer_reply" and head["ref"] == 11
    assert head["task"] == "emb" and head["version"] >= 1 and head["truncated"] == [False, False]
    assert {"labels", "similarity", "tokens"}.isdisjoint(head)       # absent fields are omitted
    assert len(frames) == 2                                           # header + the embeddings
    emb = tensor(frames, head["embeddings"], "float32")
    assert emb.shape == (2, 32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    for ref in (21, 22, 23):                                          # pipelined, matched by ref
        task.send(pack(type="infer", ref=ref, texts=["x"] * (ref - 20), timeout_ms=5000))
    got = {}
    while len(got) < 3:
        h, f = task.recv()
        got[h["ref"]] = tensor(f, h["embeddings"], "float32").shape
    assert got == {21: (1, 32), 22: (2, 32), 23: (3, 32)}

    err, _ = task.request(pack(type="infer", ref=24, texts=["a"], pairs=["b"]))
    assert_error(err, "invalid_input", 24)                            # request failed, peer fine
    task.close()
    c.close()


def test_malformed_frames_get_typed_errors_and_the_daemon_keeps_answering(ctx, daemon):
    c = control(ctx, daemon)
    cases = [
        ("not msgpack", [b"\xc1"], "bad_frame", 0),
        ("REQ envelope", [b"", pack(type="info", ref=30)], "bad_frame", 0),
        ("not a map", [msgpack.packb([1, 2])], "bad_message", 0),
        ("unknown type", [pack(type="no_such_message", ref=31)], "unknown_type", 31),
        ("missing field", [pack(type="resolve", ref=32)], "bad_message", 32),
        ("unknown field", [pack(type="info", ref=33, colour="blue")], "bad_message", 33),
        ("wrong field type", [pack(type="resolve", ref=34, name=b"emb")], "bad_message", 34),
        ("name pattern", [pack(type="resolve", ref=35, name="../x")], "bad_message", 35),
        ("extra tensor frame", [pack(type="info", ref=36), b"\x00" * 4], "bad_frame", 36),
        ("66 frames", [pack(type="info", ref=37)] + [b""] * 65, "bad_frame", 37),
        ("not on this socket", [pack(type="infer", ref=38, texts=["x"])], "unexpected", 38),
        ("checked before fields", [pack(type="submit", epoch=1, ref=39, output="pooled", lengths=[1],
                                        ids={"dtype": "int32", "shape": [1], "frame": 1})],
         "unexpected", 39),                                           # §5.5: step 6 before 7
    ]
    for i, (label, frames, code, ref) in enumerate(cases):
        c.send(*frames)
        head, _ = c.recv()
        assert head["type"] == "error" and head["code"] == code and head["ref"] == ref, (label, head)
        assert head["code"] in PROTOCOL_CODES
        probe = 100 + i                                                # still answering?
        alive, _ = c.request(pack(type="health", ref=probe))
        assert alive == {"type": "health_reply", "ref": probe, "live": True, "ready": True,
                         "detail": alive["detail"]}, label
    c.close()


def test_handle_plane_refuses_a_bad_token(daemon):
    s = handle_plane(daemon)
    try:
        head, fds = handle_request(s, pack(type="open_regions", ref=40, token=b"\x00" * 16))
        assert fds == []
        assert_error(head, "unauthorized", 40)
        head, fds = handle_request(s, b"\xc1")                          # malformed: ref is 0
        assert fds == [] and head["code"] == "bad_frame" and head["ref"] == 0
        head, fds = handle_request(s, pack(type="open_regions", ref=41, token="text, not bin"))
        assert fds == [] and head["code"] == "bad_message"
        head, fds = handle_request(s, pack(type="info", ref=42))         # valid, wrong socket
        assert fds == [] and head["code"] == "unexpected" and head["ref"] == 42
        head, fds = handle_request(s, pack(type="open_regions", ref=43, token=os.urandom(16)))
        assert fds == []
        assert_error(head, "unauthorized", 43)                           # connection still served
    finally:
        s.close()


# ------------------------------------------------------------------------------- a task process


class RawTask:
    """A task process written from docs/protocol.md §13: handle plane + task-plane DEALER."""

    def __init__(self, ctx, daemon):
        self.handles = handle_plane(daemon)                             # §13.1
        self.dealer = Dealer(ctx, f"ipc://{daemon.run_dir}/tasks.sock")
        self.dealer.on_idle = self.beat
        self.epoch, self.refs, self.seq, self.last_beat = 0, 100, 0, 0.0
        self.heard_beats, self.period_s = 0, 0.0

    def hello(self) -> dict:
        """§8: the handshake gives the heartbeat period and the backbones."""
        welcome, _ = self.request("hello", proto=PROTO, role="task", pid=os.getpid())
        assert welcome["type"] == "welcome", welcome
        self.period_s = welcome["heartbeat_ms"] / 1e3
        return welcome

    def ref(self) -> int:
        self.refs += 1
        return self.refs

    def beat(self) -> None:
        """§10: a heartbeat per session every heartbeat_ms."""
        if self.epoch and time.monotonic() - self.last_beat >= self.period_s:
            self.last_beat = time.monotonic()
            self.seq += 1
            self.dealer.send(pack(type="heartbeat", epoch=self.epoch, seq=self.seq))

    def request(self, type_: str, *frames: bytes, **fields) -> tuple[dict, list]:
        ref = self.ref()
        if self.epoch and "epoch" not in fields and type_ not in ("hello", "register"):
            fields["epoch"] = self.epoch
        self.dealer.send(pack(type=type_, ref=ref, **fields), *frames)
        while True:
            head, got = self.dealer.recv()
            if head["type"] == "heartbeat":
                assert head["epoch"] == self.epoch
                self.heard_beats += 1
                continue
            if head.get("ref") == ref:
                return head, got

    def open_slot(self, grant: dict) -> mmap.mmap:
        """§13.3: token -> [backbone fd, slot fd]; map the slot read-write."""
        head, fds = handle_request(self.handles, pack(type="open_regions", ref=self.ref(),
                                                      token=grant["token"]))
        try:
            assert head["type"] == "regions_granted", head
            assert len(fds) == 2 and head["slot_size"] == grant["size"] == 2 * grant["half_bytes"]
            assert head["slot_generation"] == grant["generation"]
            backbone, slot = fds
            assert os.fstat(backbone).st_size == head["backbone"]["size"]
            with pytest.raises(PermissionError):                        # sealed: read-only for all
                mmap.mmap(backbone, head["backbone"]["size"], mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE)
            return mmap.mmap(slot, head["slot_size"], mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def write(region: mmap.mmap, grant: dict, tensors: dict[str, np.ndarray]) -> None:
        base = grant["half"] * grant["half_bytes"]
        for e in grant["entries"]:
            raw = np.ascontiguousarray(tensors[e["name"]], dtype="<f4")
            assert e["dtype"] == "float32" and list(raw.shape) == e["shape"]
            assert e["offset"] % 256 == 0
            region[base + e["offset"]:base + e["offset"] + raw.nbytes] = raw.tobytes()

    def wait_heartbeat(self) -> None:
        """A daemon heartbeat for our session arrives within a few periods (§10)."""
        deadline = time.monotonic() + 2 * 5 * self.period_s          # it beats every 5 periods
        while self.heard_beats == 0:
            head, _ = self.dealer.recv(int(max(0.0, deadline - time.monotonic()) * 1000) + 1)
            if head["type"] == "heartbeat":
                assert head["epoch"] == self.epoch and isinstance(head["seq"], int)
                self.heard_beats += 1

    def submit(self, ids: list[int]) -> tuple[dict, list]:
        ids_frame = np.asarray(ids, dtype="<i4").tobytes()
        return self.request("submit", ids_frame, output="pooled", lengths=[len(ids)],
                            ids={"dtype": "int32", "shape": [len(ids)], "frame": 1})

    def close(self) -> None:
        self.dealer.close()
        self.handles.close()


def lora(rank: int, b_scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"lora.0.query.A": rng.normal(0, 1, (rank, 32)).astype(np.float32),
            "lora.0.query.B": (b_scale * rng.normal(0, 1, (32, rank))).astype(np.float32)}


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_a_raw_task_registers_commits_serves_and_updates(ctx, daemon, emb_task):
    from tokenizers import Tokenizer         # the backbone's tokenizer.json (§12), not fmplex code
    t = RawTask(ctx, daemon)
    try:
        welcome = t.hello()
        info = welcome["backbones"][0]
        ext = {"pooling": "mean", "lora": [{"layer": 0, "module": "query", "rank": 2, "scale": 1.0}]}
        reg, _ = t.request("register", proto=PROTO, task={"name": "rawtask", "owner_uid": os.getuid()},
                           extension=ext, pid=os.getpid())
        assert reg["type"] == "registered" and 1 <= reg["epoch"] < U63
        assert reg["epoch"] != welcome["epoch"] and reg["heartbeat_ms"] == HEARTBEAT_MS
        t.epoch = reg["epoch"]
        g1 = reg["slot"]
        assert (g1["generation"], g1["half"]) == (1, 0) and isinstance(g1["token"], bytes)
        assert [(e["name"], e["shape"], e["offset"]) for e in g1["entries"]] == [
            ("lora.0.query.A", [2, 32], 0), ("lora.0.query.B", [32, 2], 256)]   # §13.3 layout
        assert g1["half_bytes"] % 4096 == 0 and g1["size"] == 2 * g1["half_bytes"]

        early, _ = t.submit([101, 102])                                     # before the commit
        assert_error(early, "not_registered", early["ref"], admission=True)
        assert (early["seen"], early["room"]) == (1, 256)          # §13.5: the first one seen

        slot = t.open_slot(g1)
        t.write(slot, g1, lora(2, 0.0, seed=1))                             # B = 0: the base model
        done, _ = t.request("commit", generation=1, half=0)
        assert done == {"type": "committed", "epoch": t.epoch, "ref": done["ref"], "version": 1}

        tok = Tokenizer.from_file(info["tokenizer"])       # as a task does (§12): no padding,
        tok.no_padding()                                   # truncation to the positions left
        tok.enable_truncation(info["max_positions"])
        ids = tok.encode("hello world").ids
        res, frames = t.submit(ids)
        assert res["type"] == "result" and res["epoch"] == t.epoch and res["version"] == 1, res
        assert (res["seen"], res["room"]) == (2, 256)              # taken: the queue is empty
        base = tensor(frames, res["data"], "float32")
        assert base.shape == (1, 32) and res["output"] == "pooled"
        client = Dealer(ctx, f"ipc://{daemon.run_dir}/tenants/{os.getuid()}/emb.sock")
        reply, rf = client.request(pack(type="infer", ref=1, texts=["hello world"]))
        client.close()                           # the emb task: mean pooling, L2-normalised (§12)
        assert reply["type"] == "infer_reply", reply
        assert np.allclose(normalize(base), tensor(rf, reply["embeddings"], "float32"), atol=1e-4)

        # §13.7, same layout: same generation and token, the other half.
        ready, _ = t.request("prepare_update", extension={**ext, "lora": [{**ext["lora"][0],
                                                                           "scale": 2.0}]})
        g = ready["slot"]
        assert ready["type"] == "update_ready" and (g["generation"], g["half"]) == (1, 1)
        assert g["token"] == g1["token"]
        t.write(slot, g, lora(2, 1.0, seed=2))
        done, _ = t.request("commit", generation=1, half=1)
        assert done["type"] == "committed" and done["version"] == 2
        res, frames = t.submit(ids)
        assert res["version"] == 2 and not np.allclose(tensor(frames, res["data"], "float32"), base)

        # §13.7, new layout: a new slot (generation 2, new token) mapped over the same connection.
        ready, _ = t.request("prepare_update", extension={"pooling": "mean", "lora": [
            {"layer": 0, "module": "query", "rank": 4, "scale": 1.0}]})
        g2 = ready["slot"]
        assert (g2["generation"], g2["half"]) == (2, 0) and g2["token"] != g1["token"]
        slot2 = t.open_slot(g2)
        t.write(slot2, g2, lora(4, 0.0, seed=3))
        done, _ = t.request("commit", generation=2, half=0)
        assert done["version"] == 3
        res, frames = t.submit(ids)
        assert res["version"] == 3
        assert np.allclose(tensor(frames, res["data"], "float32"), base, atol=1e-5)
        old, fds = handle_request(t.handles, pack(type="open_regions", ref=t.ref(), token=g1["token"]))
        assert fds == [] and old["code"] == "unauthorized"                  # the old slot retired
        slot.close()

        bad, _ = t.request("commit", generation=7, half=0)                  # nothing staged
        assert_error(bad, "invalid_input", bad["ref"])
        assert bad["epoch"] == t.epoch
        t.wait_heartbeat()                                                  # §10: both ways

        # §13.8 then §9: after unregister the epoch is stale.
        bye, _ = t.request("unregister")
        assert bye["type"] == "ok"
        stale, _ = t.submit(ids)
        assert_error(stale, "stale_epoch", stale["ref"])
        assert stale["epoch"] == t.epoch
        t.dealer.send(pack(type="heartbeat", epoch=t.epoch, seq=999))
        head, _ = t.dealer.reply_to(0)
        assert_error(head, "stale_epoch", 0)
        slot2.close()
    finally:
        t.close()


def relay(ctx, daemon, name: str, answer) -> dict:
    """§13.6: an operator's task_command reaches the raw task as a command; `answer(cmd)` builds the
    task's reply; returns what the operator gets."""
    t = RawTask(ctx, daemon)
    op = control(ctx, daemon)
    try:
        t.hello()
        reg, _ = t.request("register", proto=PROTO, task={"name": name, "owner_uid": os.getuid()}, extension={})
        t.epoch = reg["epoch"]
        t.open_slot(reg["slot"]).close()                                   # no tensors to write
        assert t.request("commit", generation=1, half=0)[0]["type"] == "committed"
        op.send(pack(type="task_command", ref=77, name=name, op="rollback"))
        cmd, _ = _next_command(t)
        assert cmd["epoch"] == t.epoch and cmd["op"] == "rollback" and cmd["ref"] >= 1 << 40
        t.dealer.send(pack(**answer(cmd)))
        head, _ = op.reply_to(77)
        t.request("unregister")
        return head
    finally:
        op.close()
        t.close()


def _next_command(t: RawTask) -> tuple[dict, list]:
    while True:
        head, frames = t.dealer.recv()
        if head["type"] == "command":
            return head, frames


def test_a_relayed_command_error_reaches_the_operator(ctx, daemon):
    head = relay(ctx, daemon, "raw-cmd-err", lambda cmd: dict(
        type="error", ref=cmd["ref"], code="invalid_input", message="no canary", epoch=cmd["epoch"]))
    assert_error(head, "invalid_input", 77)
    assert head["message"] == "no canary"


def test_a_relayed_command_ok_reaches_the_operator(ctx, daemon):
    head = relay(ctx, daemon, "raw-cmd-ok", lambda cmd: dict(type="ok", ref=cmd["ref"],
                                                             message="rolled back"))
    assert head == {"type": "ok", "ref": 77, "message": "rolled back"}

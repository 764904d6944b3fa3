"""Bad input on the client/task side, with real processes: garbage on a task endpoint gets typed
errors while the task keeps serving; unknown tasks, over-long inputs, bad similarity pairs, a wrong
protocol version; task specs that are wrong in every way (parse_spec and `fmplex task run`)."""
import os
import random
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq

from ipc import transport
from ipc.errors import ErrorCode, FmplexError, InvalidRequest, UnknownTask
from ipc.messages import PROTOCOL_VERSION, Error, Hello, Infer, InferReply, Role
from ipc.spec import Pipeline, SpecError, parse_spec
from testkit.launch import REPO, Daemon, TaskProc, Traffic, short_tmpdir, write_spec
from testkit.tiny import write_random_head as write_head

HIDDEN = 32
POSITIONS = 64            # the tiny backbone's limit
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def env(tiny_bert):
    d = Daemon(tiny_bert, config="liveness_ms = 5000").start()    # slack for a loaded machine
    specs = short_tmpdir("fmx-bad-")
    write_head(os.path.join(specs, "head.safetensors"), 2, HIDDEN, seed=3)
    paths = {
        "emb": write_spec(specs, "emb", 'pipeline = "text-embedding"'),
        "cls": write_spec(specs, "cls", 'pipeline = "text-classification"\nlabels = ["no", "yes"]\n'
                                        '[extension]\nhead = "head.safetensors"'),
        "sim": write_spec(specs, "sim", 'pipeline = "sentence-similarity"'),
    }
    procs = {}
    try:
        for name, path in paths.items():
            procs[name] = TaskProc(path, d.run_dir).start()
        yield d, specs, procs
    finally:
        for p in procs.values():
            p.stop()
        d.cleanup()


@pytest.fixture
def raw(env):
    """A raw DEALER on the `emb` task's endpoint."""
    d, _, _ = env
    with d.client() as c:
        address = c.endpoint("emb").address
    ctx = zmq.Context()
    sock = transport.dealer(ctx, address)
    yield sock
    sock.close(linger=0)
    ctx.term()


def exchange(sock, frames: list[bytes]):
    """Send raw frames, return the one decoded reply (bounded wait)."""
    sock.send_multipart(frames)
    assert sock.poll(WAIT_MS), f"no reply to {frames!r:.200}"
    return transport.recv_sync(sock, router_side=False).decode()


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


GARBAGE = [   # (what, frames, expected code, expected ref)
    ("never-used msgpack byte", [b"\xc1"], ErrorCode.BAD_FRAME, 0),
    ("random bytes", [random.Random(7).randbytes(257)], ErrorCode.BAD_FRAME, 0),
    ("truncated msgpack map", [pack({"type": "infer", "ref": 3, "texts": ["a"]})[:-2]],
     ErrorCode.BAD_FRAME, 0),
    ("empty frame", [b""], ErrorCode.BAD_FRAME, 0),
    ("msgpack array", [pack([1, 2, 3])], ErrorCode.BAD_MESSAGE, 0),
    ("msgpack int", [pack(42)], ErrorCode.BAD_MESSAGE, 0),
    ("type not a string", [pack({"type": 5, "ref": 4})], ErrorCode.BAD_MESSAGE, 4),
    ("unknown type", [pack({"type": "inference", "ref": 5})], ErrorCode.UNKNOWN_TYPE, 5),
    ("texts not a list", [pack({"type": "infer", "ref": 6, "texts": "hello"})],
     ErrorCode.BAD_MESSAGE, 6),
    ("texts of ints", [pack({"type": "infer", "ref": 7, "texts": [1, 2]})], ErrorCode.BAD_MESSAGE, 7),
    ("top_k a string", [pack({"type": "infer", "ref": 8, "texts": ["a"], "top_k": "3"})],
     ErrorCode.BAD_MESSAGE, 8),
    ("negative timeout", [pack({"type": "infer", "ref": 9, "texts": ["a"], "timeout_ms": -1})],
     ErrorCode.BAD_MESSAGE, 9),
    ("texts missing", [pack({"type": "infer", "ref": 10})], ErrorCode.BAD_MESSAGE, 10),
    ("unknown field", [pack({"type": "infer", "ref": 11, "texts": ["a"], "colour": "red"})],
     ErrorCode.BAD_MESSAGE, 11),
    ("no texts", [pack({"type": "infer", "ref": 12, "texts": []})], ErrorCode.BAD_MESSAGE, 12),
    ("too many texts", [pack({"type": "infer", "ref": 13, "texts": ["x"] * 1025})],
     ErrorCode.BAD_MESSAGE, 13),
    ("a text over 100000 characters", [pack({"type": "infer", "ref": 14, "texts": ["x" * 100_001]})],
     ErrorCode.BAD_MESSAGE, 14),
    ("ref out of range", [pack({"type": "infer", "ref": -1, "texts": ["a"]})],
     ErrorCode.BAD_MESSAGE, 0),
    ("an unreferenced extra frame", [pack({"type": "infer", "ref": 15, "texts": ["a"]}), b"extra"],
     ErrorCode.BAD_FRAME, 15),
    ("a message of another socket",
     [pack({"type": "hello", "ref": 16, "proto": PROTOCOL_VERSION, "role": "task"})],
     ErrorCode.UNEXPECTED, 16),
]


def test_garbage_on_an_endpoint_gets_typed_errors_and_the_task_keeps_serving(env, raw):
    d, _, procs = env
    with Traffic(d.run_dir, ["emb", "cls"]) as traffic:
        for what, frames, code, ref in GARBAGE:
            reply = exchange(raw, frames)
            assert isinstance(reply, Error), what
            assert (reply.code, reply.ref) == (code, ref), (what, reply)
        # The same connection still works, and so does the task for everyone else.
        reply = exchange(raw, [pack({"type": "infer", "ref": 99, "texts": ["fine now"]})])
        assert isinstance(reply, InferReply) and reply.ref == 99
        assert reply.embeddings.shape == (1, HIDDEN)
        deadline = time.monotonic() + WAIT_MS / 1e3
        while not traffic.ok["emb"] and time.monotonic() < deadline:   # one overlapping call
            assert raw.poll(10) == 0                       # (a bounded wait on our socket)
    assert not traffic.failed["emb"] and not traffic.failed["cls"], traffic.failed
    assert traffic.ok["emb"] and traffic.ok["cls"]
    assert procs["emb"].proc.poll() is None


def test_wrong_protocol_version_in_infer(env, raw):
    reply = exchange(raw, [pack({"type": "infer", "ref": 21, "texts": ["a"],
                                 "proto": PROTOCOL_VERSION + 1})])
    assert isinstance(reply, Error) and reply.ref == 21
    assert reply.code is ErrorCode.VERSION_MISMATCH and f"{PROTOCOL_VERSION + 1}" in reply.message
    ok = exchange(raw, [pack({"type": "infer", "ref": 22, "texts": ["a"], "proto": PROTOCOL_VERSION})])
    assert isinstance(ok, InferReply) and ok.ref == 22


def test_unknown_task_is_unknown_task(env):
    d, _, _ = env
    with d.client() as c, pytest.raises(UnknownTask) as e:
        c.infer("no-such-task", ["x"])
    assert e.value.code is ErrorCode.UNKNOWN_TASK and "no-such-task" in e.value.message


def test_over_long_input_is_truncated_and_marked(env):
    d, _, _ = env
    long_text = " ".join(f"word{i % 37} and more" for i in range(500 // 3 + 1))
    assert len(long_text.split()) >= 500
    short = "a short one"
    with d.client() as c:
        emb = c.infer("emb", [long_text, short])
        assert emb.truncated == [True, False] and emb.embeddings.shape == (2, HIDDEN)
        cls = c.infer("cls", [short, long_text])
        assert cls.truncated == [False, True] and len(cls.labels) == 2
        sim = c.infer("sim", [short, short], pairs=[long_text, short])
        assert sim.truncated == [True, False]
        # Exactly the backbone's limit: "hello" is one token, plus [CLS] and [SEP].
        fits = c.infer("emb", ["hello " * (POSITIONS - 2), "hello " * (POSITIONS - 1), "hello " * 500])
        assert fits.truncated == [False, True, True]
        # A truncated input is the prefix that fits: all three see the same 64 tokens.
        assert np.allclose(fits.embeddings[0], fits.embeddings[1], atol=1e-5)
        assert np.allclose(fits.embeddings[0], fits.embeddings[2], atol=1e-5)


def test_similarity_pairs_must_match_texts(env):
    d, _, _ = env
    with d.client() as c:
        for pairs in (["only one"], ["one", "two", "three"], None):
            with pytest.raises(InvalidRequest) as e:
                c.infer("sim", ["a", "b"], pairs=pairs)
            assert e.value.code is ErrorCode.INVALID_INPUT and "pairs" in e.value.message
        with pytest.raises(InvalidRequest):
            c.infer("cls", ["a"], pairs=["b"])             # a classifier takes no pairs
        assert len(c.infer("sim", ["a", "b"], pairs=["c", "d"]).similarity) == 2


# ---------------------------------------------------------------- task specs

GOOD = 'name = "t"\npipeline = "text-embedding"\n'
CLS = 'name = "t"\npipeline = "text-classification"\nlabels = ["a", "b"]\n'
BAD_SPECS = [   # (spec text, the exact message)
    ('pipeline = "text-embedding"', "spec field 'name': missing"),
    ('name = "t"', "spec field 'pipeline': missing"),
    ('name = 5\npipeline = "text-embedding"', "spec field 'name': must be a str"),
    ('name = "bad name!"\npipeline = "text-embedding"',
     "spec field 'name': 'bad name!' must match [A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}"),
    ('name = "t"\npipeline = "translation"',
     f"spec field 'pipeline': 'translation' is not one of {[p.value for p in Pipeline]}"),
    (GOOD + 'weight = "heavy"', "spec field 'weight': must be a number"),
    (GOOD + "weight = 0", "spec field 'weight': 0 outside [0.001, 1000000.0]"),
    (GOOD + "queue_limit = 1.5", "spec field 'queue_limit': must be an integer"),
    (GOOD + "deadline_ms = true", "spec field 'deadline_ms': must be an integer"),
    (GOOD + "top_k = 0", "spec field 'top_k': 0 outside [1, 4096]"),
    (GOOD + 'pooling = "max"', "spec field 'pooling': 'max' is not one of ['cls', 'mean']"),
    (GOOD + "owner = true", "spec field 'owner': must be a user name or a uid"),
    (GOOD + "owner = -3", "spec field 'owner': must be a user name or a uid"),
    (GOOD + 'owner = "no-such-user-here"', "spec field 'owner': no user named 'no-such-user-here'"),
    (GOOD + 'labels = "a"', "spec field 'labels': must be a list"),
    (GOOD + "labels = [1, 2]", "spec field 'labels': must be a list of non-empty strings"),
    (GOOD + "colour = 1", "spec field 'colour': unknown field"),
    (GOOD + "extension = 3", "spec field 'extension': must be a table"),
    (GOOD + '[extension]\nadpater = "x"', "spec field 'extension.adpater': unknown field"),
    (GOOD + '[extension]\nhead_activation = "swish"',
     "spec field 'extension.head_activation': 'swish' is not one of ['relu', 'gelu', 'tanh']"),
    (GOOD + "[endpoint]\nport = 7000", "spec field 'endpoint.port': unknown field"),
    (GOOD + '[endpoint]\ntcp = "udp://x:1"', "spec field 'endpoint.tcp': must be a tcp:// address"),
    (GOOD + '[endpoint]\nauthorized_keys = ["short"]',
     "spec field 'endpoint.authorized_keys': must be Z85 public keys (40 characters)"),
    ('name = "t"\npipeline = "text-classification"',
     "spec field 'labels': a text-classification task needs its labels"),
    (CLS, "spec field 'extension.head': a text-classification task needs a head file"),
]


@pytest.mark.parametrize("text, message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_spec_names_the_field(text, message):
    with pytest.raises(SpecError) as e:
        parse_spec(text)
    assert e.value.code is ErrorCode.INVALID_INPUT and e.value.message == message


def test_bad_toml_is_a_spec_error():
    with pytest.raises(SpecError) as e:
        parse_spec('name = "t\npipeline = ')
    assert e.value.code is ErrorCode.INVALID_INPUT and e.value.message.startswith("spec field '<toml>'")


def test_good_specs_parse():
    spec = parse_spec(CLS + 'owner = "root"\n[extension]\nhead = "h.safetensors"', base_dir="/specs")
    assert spec.pipeline is Pipeline.CLASSIFICATION and spec.labels == ("a", "b")
    assert spec.head == "/specs/h.safetensors" and spec.owner_uid == 0
    assert parse_spec(GOOD).owner_uid == os.getuid()


def task_run(spec_path: str, run_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmplex", "--run-dir", run_dir, "task", "run",
                           spec_path], cwd=REPO, capture_output=True, timeout=120)


@pytest.mark.parametrize("body, line", [
    ('pipeline = "text-embedding"', "fmplex-task-error: invalid_input: spec field 'name': missing"),
    ('name = "t"\npipeline = "text-embedding"\ncolour = "red"',
     "fmplex-task-error: invalid_input: spec field 'colour': unknown field"),
    ('name = "t"\npipeline = "text-embedding"\nweight = "x"',
     "fmplex-task-error: invalid_input: spec field 'weight': must be a number"),
])
def test_task_run_on_a_bad_spec_exits_2_with_the_error_line(env, body, line):
    d, specs, _ = env
    path = os.path.join(specs, "bad.toml")
    with open(path, "w") as f:
        f.write(body + "\n")
    out = task_run(path, d.run_dir)
    assert out.returncode == 2, out
    assert out.stderr.decode().strip().splitlines()[-1] == line


def test_task_run_with_labels_that_do_not_match_the_head(env):
    d, specs, _ = env
    path = write_spec(specs, "mismatch", 'pipeline = "text-classification"\nlabels = ["a", "b", "c"]\n'
                                         '[extension]\nhead = "head.safetensors"')
    out = task_run(path, d.run_dir)
    assert out.returncode == 2, out
    assert out.stderr.decode().strip().splitlines()[-1] == (
        "fmplex-task-error: invalid_extension: the head has 2 outputs but the spec lists 3 labels")
    with d.client() as c, pytest.raises(FmplexError):      # it never registered
        c.infer("mismatch", ["x"])


def test_task_run_on_a_missing_spec_file(env):
    d, specs, _ = env
    out = task_run(os.path.join(specs, "nope.toml"), d.run_dir)
    assert out.returncode == 2
    assert out.stderr.decode().strip().splitlines()[-1].startswith(
        "fmplex-task-error: invalid_input: spec field '<file>': cannot read ")

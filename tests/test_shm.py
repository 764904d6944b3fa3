"""Host shared memory: sealed memfd regions, zero-copy read-only views, and what happens across
processes (a stray write kills the writer only; a slot written by its owner is seen by an importer).
"""
from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import mmap
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ipc import shm
from ipc.messages import Manifest, ManifestEntry

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 30


@pytest.fixture
def spawn():
    """Start `python -c code args...` children with the repo importable; kill and reap them all."""
    procs: list[subprocess.Popen] = []

    def start(code: str, *args, pass_fds=()) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args)], cwd=REPO, pass_fds=pass_fds,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=CHILD_TIMEOUT_S)


@pytest.fixture
def fds():
    """fds to close at the end of the test."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "w.f32": rng.standard_normal((7, 5)).astype(np.float32),
        "w.f16": rng.standard_normal(33).astype(np.float16),
        "w.f64": rng.standard_normal((2, 2, 2)),
        "w.i64": np.arange(-5, 6, dtype=np.int64),
        "w.i32": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],   # non-contiguous input
        "w.i8": np.array([-128, 0, 127], dtype=np.int8),
        "w.u8": np.arange(256, dtype=np.uint8),
        "w.bool": np.array([True, False, True]),
        "w.bf16": np.array([0x3F80, 0x4000, 0xBF80], dtype=np.uint16),     # 1.0, 2.0, -1.0 as bf16
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.5, np.float32),
    }


def export(fds, arrays=None, **kw) -> tuple[int, Manifest, dict[str, np.ndarray]]:
    arrays = sample_arrays() if arrays is None else arrays
    fd, manifest = shm.export_tensors("test", arrays, dtypes={"w.bf16": "bfloat16"}, **kw)
    fds.append(fd)
    return fd, manifest, arrays


def entry_json(entry: ManifestEntry) -> str:
    return json.dumps(dataclasses.asdict(entry))


# ---------------------------------------------------------------- layout and export

def test_plan_layout_aligns_every_entry():
    entries, size = shm.plan_layout([("a", "float32", [3]), ("b", "int8", [1]), ("c", "float64", [2, 2]),
                                     ("d", "uint8", [0]), ("e", "float16", [])], alignment=64)
    assert [e.offset for e in entries] == [0, 64, 128, 192, 192]
    assert size == 256 and size % 64 == 0
    assert shm.plan_layout([], 256) == ([], 256)     # never an empty mapping


def test_export_manifest_describes_the_arrays(fds):
    fd, manifest, arrays = export(fds, alignment=128)
    assert manifest.alignment == 128 and manifest.size % 128 == 0
    assert os.fstat(fd).st_size == manifest.size
    by_name = {e.name: e for e in manifest.entries}
    assert list(by_name) == list(arrays)
    for name, arr in arrays.items():
        e = by_name[name]
        assert e.offset % 128 == 0 and e.shape == list(arr.shape)
        assert e.offset + arr.nbytes <= manifest.size
    assert by_name["w.bf16"].dtype == "bfloat16" and by_name["w.f16"].dtype == "float16"
    assert by_name["w.bool"].dtype == "bool" and by_name["w.f64"].dtype == "float64"


def test_export_refuses_an_unsupported_dtype():
    with pytest.raises(TypeError):
        shm.export_tensors("bad", {"c": np.zeros(2, np.complex64)})


def test_mapped_arrays_are_zero_copy_read_only_views(fds):
    fd, manifest, arrays = export(fds)
    region = shm.MappedRegion(fd, manifest.size)
    lo, hi = region.address, region.address + manifest.size
    for entry in manifest.entries:
        view = region.array(entry)
        want = arrays[entry.name]
        assert view.shape == want.shape
        assert np.array_equal(view, want) if entry.dtype != "bfloat16" else \
            np.array_equal(view, want.view(np.uint16))
        assert not view.flags.writeable
        assert view.size == 0 or lo <= view.ctypes.data and view.ctypes.data + view.nbytes <= hi
        assert view.size == 0 or view.ctypes.data == lo + entry.offset
        if view.size:
            with pytest.raises(ValueError):
                view.reshape(-1)[0] = 0
    region.close()


def test_bytes_view_range_is_checked(fds):
    fd, manifest, _ = export(fds)
    region = shm.MappedRegion(fd, manifest.size)
    assert region.bytes_view(0).size == manifest.size
    assert region.bytes_view(manifest.size - 1, 1).size == 1
    for offset, nbytes in [(-1, 1), (0, manifest.size + 1), (manifest.size, 1), (5, -6)]:
        with pytest.raises(ValueError):
            region.bytes_view(offset, nbytes)
    # An entry lying past the end of the region is refused, not read out of bounds.
    with pytest.raises(ValueError):
        region.array(ManifestEntry(name="x", dtype="float32", shape=[4], offset=manifest.size - 8))
    region.close()


def test_close_with_live_views_keeps_them_valid(fds):
    fd, manifest, arrays = export(fds)
    region = shm.MappedRegion(fd, manifest.size)
    view = region.array(manifest.entries[0])
    region.close()     # must not raise while a view is alive
    assert np.array_equal(view, arrays[manifest.entries[0].name])


def test_checksum_verify(fds):
    fd, manifest, _ = export(fds)
    region = shm.MappedRegion(fd, manifest.size)
    assert region.verify(manifest)
    assert manifest.checksum == shm.checksum(region.bytes_view())
    assert not region.verify(dataclasses.replace(manifest, checksum="0" * 32))
    region.close()


def test_checksum_verify_detects_a_changed_slot(fds):
    fd = shm.create_region("slot", 4096)
    fds.append(fd)
    writer = shm.MappedRegion(fd, 4096, writable=True)
    reader = shm.MappedRegion(fd, 4096)
    manifest = Manifest(size=4096, alignment=256, checksum=shm.checksum(reader.bytes_view()),
                        entries=[])
    assert reader.verify(manifest)
    writer.bytes_view(100, 1)[0] = 1
    assert not reader.verify(manifest)


def test_torch_tensor_is_a_view_and_bfloat16_is_reinterpreted(fds):
    torch = pytest.importorskip("torch")
    fd, manifest, arrays = export(fds)
    region = shm.MappedRegion(fd, manifest.size)
    by_name = {e.name: e for e in manifest.entries}
    t = region.tensor(by_name["w.f32"])
    assert t.data_ptr() == region.address + by_name["w.f32"].offset
    assert torch.equal(t, torch.from_numpy(arrays["w.f32"]))
    bf = region.tensor(by_name["w.bf16"])
    assert bf.dtype == torch.bfloat16 and bf.tolist() == [1.0, 2.0, -1.0]


def test_ipc_imports_no_torch():
    code = ("import sys, ipc.codec, ipc.shm, ipc.transport, ipc.handles, ipc.zap, ipc.aio, "
            "ipc.addresses; sys.exit('torch' in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=CHILD_TIMEOUT_S,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


# ---------------------------------------------------------------- seals

def test_sealed_region_refuses_every_write_even_to_the_fd_holder(fds):
    fd, manifest, _ = export(fds)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == shm.SEALS
    with pytest.raises(PermissionError):
        mmap.mmap(fd, manifest.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    with pytest.raises(PermissionError):
        shm.MappedRegion(fd, manifest.size, writable=True)
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, manifest.size * 2)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    with pytest.raises(PermissionError):    # F_SEAL_SEAL: the seal set is final
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0x0010)   # F_SEAL_FUTURE_WRITE (not in fcntl on 3.11)
    # Reopening the memfd read-write through /proc gives the same sealed file.
    fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    fds.append(fd2)
    with pytest.raises(PermissionError):
        shm.MappedRegion(fd2, manifest.size, writable=True)


def test_read_only_mapping_of_a_sealed_region_cannot_be_made_writable(fds):
    fd, manifest, _ = export(fds)
    region = shm.MappedRegion(fd, manifest.size)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rc = libc.mprotect(region.address, manifest.size, mmap.PROT_READ | mmap.PROT_WRITE)
    assert rc == -1 and ctypes.get_errno() in (13, 1)   # EACCES (EPERM on some kernels)
    assert region.verify(manifest)


def test_unsealed_slot_region_is_writable_by_its_owner(fds):
    fd = shm.create_region("slot", 8192)
    fds.append(fd)
    assert os.fstat(fd).st_size == 8192
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == 0
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    region = shm.MappedRegion(fd, 8192, writable=True)
    view = region.bytes_view(4096, 4096)
    assert view.flags.writeable and not view.any()
    view[:] = 7
    assert shm.MappedRegion(fd, 8192).bytes_view(4096, 4096).min() == 7


# ---------------------------------------------------------------- across processes

READ_CHILD = """
import json, sys
from ipc.messages import ManifestEntry, Manifest
from ipc.shm import MappedRegion
fd, size, checksum, entry = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
region = MappedRegion(fd, size)
arr = region.array(ManifestEntry(**entry))
ok = region.verify(Manifest(size=size, alignment=1, checksum=checksum, entries=[]))
print(json.dumps({"values": arr.tolist(), "verify": ok, "writeable": arr.flags.writeable}))
"""

CRASH_CHILD = """
import ctypes, json, resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
from ipc.messages import ManifestEntry
from ipc.shm import MappedRegion
fd, size, entry = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
arr = MappedRegion(fd, size).array(ManifestEntry(**entry))
print(json.dumps(arr.tolist()), flush=True)
ctypes.memset(arr.ctypes.data, 0, arr.nbytes)       # a stray write through the read-only mapping
print("survived", flush=True)
"""


def test_stray_write_kills_only_the_writer(fds, spawn):
    fd, manifest, arrays = export(fds)
    entry = next(e for e in manifest.entries if e.name == "w.f32")
    want = arrays["w.f32"].tolist()
    mine = shm.MappedRegion(fd, manifest.size)          # the exporter keeps its own mapping

    crasher = spawn(CRASH_CHILD, fd, manifest.size, entry_json(entry), pass_fds=(fd,))
    out, err = crasher.communicate(timeout=CHILD_TIMEOUT_S)
    assert crasher.returncode == -signal.SIGSEGV, err
    lines = out.splitlines()
    assert lines == [json.dumps(want)], (out, err)     # it read the values, then died writing

    assert mine.array(entry).tolist() == want
    assert mine.verify(manifest)

    reader = spawn(READ_CHILD, fd, manifest.size, manifest.checksum, entry_json(entry), pass_fds=(fd,))
    out, err = reader.communicate(timeout=CHILD_TIMEOUT_S)
    assert reader.returncode == 0, err
    assert json.loads(out) == {"values": want, "verify": True, "writeable": False}


WRITE_CHILD = """
import os, sys
import numpy as np
from ipc.shm import MappedRegion
fd, size, ready = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
region = MappedRegion(fd, size, writable=True)
region.bytes_view(0, size)[:] = (np.arange(size) * 7 % 251).astype(np.uint8)
os.write(ready, b"w")
"""


def wait_readable(fd: int, timeout_s: float = CHILD_TIMEOUT_S) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout_s)
    assert ready, f"no signal within {timeout_s}s"
    return os.read(fd, 1)


def test_slot_written_by_one_process_is_seen_by_a_read_only_importer(fds, spawn):
    size = 3 * 4096
    fd = shm.create_region("slot", size)
    fds.append(fd)
    importer = shm.MappedRegion(fd, size)       # mapped before the write: it must see the same pages
    before = importer.bytes_view()
    assert not before.any() and not before.flags.writeable

    r, w = os.pipe()
    fds.append(r)
    try:
        writer = spawn(WRITE_CHILD, fd, size, w, pass_fds=(fd, w))
    finally:
        os.close(w)                              # the child holds the only write end now
    assert wait_readable(r) == b"w"
    assert np.array_equal(before, (np.arange(size) * 7 % 251).astype(np.uint8))
    assert writer.wait(timeout=CHILD_TIMEOUT_S) == 0

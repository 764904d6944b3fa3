"""Host shared memory: memfd regions holding named tensors, exported by fd and mapped without copying.

Contract:
- `export_tensors` lays named arrays out in one memfd (each at an `alignment`-aligned offset), writes
  them, computes a blake2b checksum, then *seals* the memfd (no write, grow, shrink): from then on
  nobody, holder of the fd or not, can map it writable. It returns the fd and its `Manifest`.
- `MappedRegion(fd, size, writable=False)` maps a region PROT_READ (MAP_SHARED) and hands out numpy
  arrays / torch tensors that are views of the mapping (no copy). A stray write through a read-only
  mapping raises SIGSEGV in the writer alone.
- `create_region` makes a plain (unsealed) memfd, e.g. a task's extension slot: its owner maps it
  read-write, the daemon read-only.
"""
from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import warnings
from typing import Mapping

import numpy as np

from ipc.messages import Manifest, ManifestEntry

DEFAULT_ALIGNMENT = 256
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

# Region dtypes (a superset of wire dtypes: bfloat16 is stored raw and viewed by torch).
NUMPY_DTYPES = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
    "float64": np.dtype("<f8"), "int64": np.dtype("<i8"), "int32": np.dtype("<i4"),
    "int8": np.dtype("i1"), "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}


def dtype_size(name: str) -> int:
    return NUMPY_DTYPES[name].itemsize


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def plan_layout(specs: list[tuple[str, str, list[int]]], alignment: int = DEFAULT_ALIGNMENT
                ) -> tuple[list[ManifestEntry], int]:
    """(name, dtype, shape) -> entries with aligned offsets, and the total size (aligned)."""
    entries, offset = [], 0
    for name, dtype, shape in specs:
        offset = align_up(offset, alignment)
        entries.append(ManifestEntry(name=name, dtype=dtype, shape=list(shape), offset=offset))
        offset += dtype_size(dtype) * math.prod(shape)
    return entries, max(align_up(offset, alignment), alignment)


def create_region(name: str, size: int) -> int:
    """A new memfd of `size` bytes (zero-filled), sealable, close-on-exec. Returns the fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def checksum(buf) -> str:
    return hashlib.blake2b(buf, digest_size=16).hexdigest()


def export_tensors(name: str, arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str] | None = None,
                   alignment: int = DEFAULT_ALIGNMENT) -> tuple[int, Manifest]:
    """Write arrays into one sealed memfd. dtypes overrides the manifest dtype name per tensor
    (e.g. "bfloat16" for arrays given as raw uint16). Returns (fd, manifest)."""
    dtypes = dtypes or {}
    specs = [(k, dtypes.get(k) or _dtype_name(a.dtype), list(a.shape)) for k, a in arrays.items()]
    entries, size = plan_layout(specs, alignment)
    fd = create_region(name, size)
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        for entry, arr in zip(entries, arrays.values()):
            raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            mm[entry.offset:entry.offset + raw.nbytes] = raw.data
        digest = checksum(mm)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd, Manifest(size=size, alignment=alignment, checksum=digest, entries=entries)


def _dtype_name(dtype: np.dtype) -> str:
    for name, dt in NUMPY_DTYPES.items():
        if dt == dtype and name != "bfloat16":
            return name
    raise TypeError(f"unsupported dtype {dtype}")


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def store(dst: np.ndarray, src: np.ndarray, dtype: str) -> None:
    """Write `src` into a region view `dst` whose region dtype is `dtype` (bfloat16 views are raw
    uint16, so values are converted to bfloat16 bits rather than cast to integers)."""
    if dtype == "bfloat16":
        dst[...] = to_bfloat16_bits(np.asarray(src, np.float32))
    else:
        dst[...] = src


class MappedRegion:
    """A mapping of a region fd. Read-only unless writable=True (the slot owner's mapping)."""

    def __init__(self, fd: int, size: int, writable: bool = False):
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        self.size, self.writable = size, writable
        self._mm = mmap.mmap(fd, size, access=access)
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)

    @property
    def address(self) -> int:
        return self._buf.__array_interface__["data"][0]

    def bytes_view(self, offset: int = 0, nbytes: int | None = None) -> np.ndarray:
        end = self.size if nbytes is None else offset + nbytes
        if not 0 <= offset <= end <= self.size:
            raise ValueError(f"range [{offset}, {end}) outside region of {self.size} bytes")
        return self._buf[offset:end]

    def array(self, entry: ManifestEntry, base: int = 0) -> np.ndarray:
        """A numpy view of one entry (at base + entry.offset)."""
        dtype = NUMPY_DTYPES[entry.dtype]
        nbytes = dtype.itemsize * math.prod(entry.shape)
        return self.bytes_view(base + entry.offset, nbytes).view(dtype).reshape(entry.shape)

    def tensor(self, entry: ManifestEntry, base: int = 0):
        """A torch view of one entry (imports torch; task processes that stay lean never call it)."""
        import torch
        arr = self.array(entry, base)
        with warnings.catch_warnings():   # torch warns on read-only memory; it is read-only by design
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if entry.dtype == "bfloat16" else t

    def verify(self, manifest: Manifest) -> bool:
        """Recompute the checksum (reads every page)."""
        return checksum(self._mm) == manifest.checksum

    def close(self) -> None:
        """Unmap once no view is alive; with live views the mapping stays until they are freed."""
        self._buf = None
        try:
            self._mm.close()
        except BufferError:
            pass

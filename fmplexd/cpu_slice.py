"""A thread's EEVDF time slice (Linux >= 6.12: sched_attr.sched_runtime of a SCHED_OTHER thread).

    set_slice_us(us)    the calling thread's requested slice (0: the kernel's default again);
                        threads and processes it starts later inherit it. Raises OSError where the
                        kernel refuses; on kernels before 6.12 the value is accepted and unused.
    slice_us(tid)       a thread's slice as the kernel reports it (any thread: 0 = the caller)

Why fmplexd asks for a short one (config latency_slice_us): under EEVDF a thread that wakes with
positive lag (it used less than its CPU share, as a task process between requests does) runs
before the running thread when its virtual deadline, slice / weight later than its start, comes
first. With the kernel's default slice (0.7 ms x (1 + log2 cpus)) a short wake-up waits for a
busy forward thread's slice to end; with 0.1 ms it does not. Lag still bounds every thread's long-
term share, so a short slice buys latency, not CPU. Policy and nice value are kept.
"""
from __future__ import annotations

import ctypes
import errno
import platform
import struct

_FORMAT = "IIQiIQQQII"           # struct sched_attr (SCHED_ATTR_SIZE_VER1: with the util clamps)
_SIZE = struct.calcsize(_FORMAT)
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}     # sched_setattr, sched_getattr
_RUNTIME = 5


def _syscalls() -> tuple[int, int]:
    calls = _SYSCALLS.get(platform.machine())
    if calls is None:
        raise OSError(errno.ENOSYS, f"sched_setattr: unknown on {platform.machine()}")
    return calls


def _attr(tid: int) -> list:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_SIZE)
    if libc.syscall(_syscalls()[1], tid, buf, _SIZE, 0):
        raise OSError(ctypes.get_errno(), f"sched_getattr({tid}) failed")
    return list(struct.unpack(_FORMAT, buf.raw))


def slice_us(tid: int = 0) -> float:
    return _attr(tid)[_RUNTIME] / 1e3


def set_slice_us(us: float) -> None:
    attr = _attr(0)
    attr[0], attr[2], attr[_RUNTIME] = _SIZE, 0, int(us * 1e3)     # size, flags, sched_runtime
    libc = ctypes.CDLL(None, use_errno=True)
    packed = ctypes.create_string_buffer(struct.pack(_FORMAT, *attr), _SIZE)
    if libc.syscall(_syscalls()[0], 0, packed, 0):
        raise OSError(ctypes.get_errno(), "sched_setattr failed")

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
_SET, _GET = 0, 1
_RUNTIME = 5


def _syscall(which: int, *args) -> None:
    """sched_setattr (_SET) or sched_getattr (_GET) with `args`; OSError where it fails."""
    name = ("sched_setattr", "sched_getattr")[which]
    calls = _SYSCALLS.get(platform.machine())
    if calls is None:
        raise OSError(errno.ENOSYS, f"{name}: unknown on {platform.machine()}")
    if ctypes.CDLL(None, use_errno=True).syscall(calls[which], *args):
        raise OSError(ctypes.get_errno(), f"{name} failed")


def _attr(tid: int) -> list:
    buf = ctypes.create_string_buffer(_SIZE)
    _syscall(_GET, tid, buf, _SIZE, 0)
    return list(struct.unpack(_FORMAT, buf.raw))


def slice_us(tid: int = 0) -> float:
    return _attr(tid)[_RUNTIME] / 1e3


def set_slice_us(us: float) -> None:
    attr = _attr(0)
    attr[0], attr[2], attr[_RUNTIME] = _SIZE, 0, int(us * 1e3)     # size, flags, sched_runtime
    _syscall(_SET, 0, ctypes.create_string_buffer(struct.pack(_FORMAT, *attr), _SIZE), 0)

"""The benchmark's child processes and their launcher: `Child` runs bench/wire.py --child ROLE ...,
`run_child` is what such a child runs (an echo peer on ipc://, an echo on an inherited AF_UNIX
socket, or the region importer of region_import.py). `EchoPeer` pairs an echo child with a DEALER."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import selectors
import signal
import socket
import subprocess
import sys

import zmq
import zmq.asyncio

from ipc import aio, codec, transport
from ipc.errors import ProtocolError

from bench.wirebench.plan import STOP

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)


def run_child(role: str, rest: list[str], parent_pid: int, imports: int) -> int:
    """The body of a `--child ROLE ...` process."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if role == "echo":
        child_echo(*rest)
    elif role == "unix":
        child_unix_echo(int(rest[0]))
    elif role == "import":
        from bench.wirebench.region_import import child_import
        child_import(rest[0], imports)
    else:
        raise SystemExit(f"unknown child role {role!r}")
    return 0


def _die_with_parent(parent_pid: int) -> None:
    """Children get SIGTERM when the benchmark dies, whatever way it dies (Linux prctl)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        sys.exit(0)


class Child:
    """A child process running bench/wire.py --child ...; killed in close() whatever happened."""

    def __init__(self, *args: str, pass_fds: tuple[int, ...] = ()):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.wire", "--child", *args,
             "--parent-pid", str(os.getpid())],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, pass_fds=pass_fds)

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

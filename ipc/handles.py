"""The handle plane: an AF_UNIX SOCK_SEQPACKET socket that passes file descriptors (SCM_RIGHTS) and
tells the server who the peer is (SO_PEERCRED: pid, uid, gid, from the kernel, unforgeable).

Each datagram is one codec message (a single header frame, no tensor frames) plus any fds. A task
keeps its connection open for its whole life: the server sees EOF the moment the process dies,
which is how the daemon learns of a dead task faster than any heartbeat. (SOCK_SEQPACKET cannot
tell an empty datagram from EOF: a peer that sends one is treated as gone.)
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable

from ipc import codec
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.messages import Error, Message

log = logging.getLogger("fmplex.handles")
MAX_DATAGRAM = 4 << 20          # replies (a backbone manifest can be large)
MAX_REQUEST = 64 << 10          # requests to the server are small; a smaller buffer is faster
MAX_FDS = 8


@dataclass(frozen=True, slots=True)
class Credentials:
    pid: int
    uid: int
    gid: int


class HandlePlaneClosed(FmplexError):
    def __init__(self):
        super().__init__(ErrorCode.DAEMON_UNAVAILABLE, "handle plane connection closed")


def peer_credentials(sock: socket.socket) -> Credentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Credentials(*struct.unpack("3i", raw))


def send_message(sock: socket.socket, msg: Message, fds: list[int] = ()) -> None:
    frames = codec.encode(msg)
    if len(frames) != 1:
        raise TypeError("handle-plane messages carry no tensor frames")
    socket.send_fds(sock, [frames[0]], list(fds))


def recv_message(sock: socket.socket, allowed: frozenset[type] | None = None,
                 max_fds: int = MAX_FDS, bufsize: int = MAX_DATAGRAM) -> tuple[Message, list[int]]:
    """One datagram -> (message, received fds). Malformed input raises ProtocolError after closing
    any fds that came with it; EOF raises HandlePlaneClosed."""
    data, fds, flags, _ = socket.recv_fds(sock, bufsize, max_fds)
    try:
        if not data and not fds:
            raise HandlePlaneClosed()
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError(ErrorCode.TOO_LARGE, "datagram or fd list truncated")
        return codec.decode([data], allowed), fds
    except BaseException as e:
        for fd in fds:
            os.close(fd)
        if isinstance(e, ProtocolError):
            e.ref = codec.peek_ref([data])     # so the Error can still be correlated
        raise


Handler = Callable[[Message, Credentials, int], tuple[Message, list[int]]]


class HandleServer:
    """Serves the handle plane inside an asyncio loop (no threads).

    handler(msg, creds, conn_id) -> (reply, fds) answers each request; a raised FmplexError is sent
    back as an Error. Clients may not send fds: any they send are closed and refused.
    on_close(conn_id, creds) is called when a connection ends (EOF, error, or peer death).
    """

    def __init__(self, path: str, handler: Handler, on_close: Callable[[int, Credentials], None],
                 allowed: frozenset[type] | None = None, mode: int = 0o666):
        self.path, self.handler, self.on_close = path, handler, on_close
        self.allowed, self.mode = allowed, mode
        self._listener: socket.socket | None = None
        self._conns: dict[int, tuple[socket.socket, Credentials]] = {}

    def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        sock.bind(self.path)
        os.chmod(self.path, self.mode)
        sock.listen(256)
        self._listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        conn_id = conn.fileno()
        self._conns[conn_id] = (conn, peer_credentials(conn))
        asyncio.get_running_loop().add_reader(conn_id, self._readable, conn_id)

    def _readable(self, conn_id: int) -> None:
        conn, creds = self._conns[conn_id]
        try:
            msg, fds = recv_message(conn, self.allowed, max_fds=MAX_FDS, bufsize=MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except (HandlePlaneClosed, OSError):
            self.drop(conn_id)
            return
        except ProtocolError as e:
            self._reply(conn_id, Error(getattr(e, "ref", 0), e.code, e.message), [])
            return
        if fds:
            for fd in fds:
                os.close(fd)
            self._reply(conn_id, Error(getattr(msg, "ref", 0), ErrorCode.UNEXPECTED,
                                       "clients may not send file descriptors"), [])
            return
        try:
            reply, out_fds = self.handler(msg, creds, conn_id)
        except FmplexError as e:
            reply, out_fds = Error(getattr(msg, "ref", 0), e.code, e.message), []
        except Exception as e:          # a handler bug: answer it rather than leave the peer waiting
            log.exception("handle-plane handler failed")
            reply, out_fds = Error(getattr(msg, "ref", 0), ErrorCode.INTERNAL, repr(e)[:500]), []
        self._reply(conn_id, reply, out_fds)

    def _reply(self, conn_id: int, reply: Message, fds: list[int]) -> None:
        try:
            send_message(self._conns[conn_id][0], reply, fds)
        except OSError:   # peer gone or not reading: the connection is over
            self.drop(conn_id)

    def drop(self, conn_id: int) -> None:
        entry = self._conns.pop(conn_id, None)
        if entry is None:
            return
        conn, creds = entry
        asyncio.get_running_loop().remove_reader(conn_id)
        conn.close()
        self.on_close(conn_id, creds)

    def close(self) -> None:
        for conn_id in list(self._conns):
            self.drop(conn_id)
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            if os.path.exists(self.path):
                os.unlink(self.path)


class HandleClient:
    """Blocking client of the handle plane; keep it open for the life of the task."""

    def __init__(self, path: str, timeout_s: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout_s)
        self.sock.connect(path)

    def request(self, msg: Message, allowed: frozenset[type] | None = None,
                max_fds: int = MAX_FDS) -> tuple[Message, list[int]]:
        send_message(self.sock, msg)
        return recv_message(self.sock, allowed, max_fds)

    def close(self) -> None:
        self.sock.close()

"""ZAP (ZeroMQ authentication protocol, RFC 27) server: decides who may connect to a socket.

libzmq asks the handler bound at inproc://zeromq.zap.01 of the socket's context about every new
connection of a socket whose zap_domain is set. For ipc:// the request's address is
"host:uid:gid:pid" from the kernel's SO_PEERCRED (unforgeable); for tcp:// with CURVE the first
credential is the client's 32-byte public key. `decide(request)` returns the User-Id to attach to the
connection (read back per message with `Envelope.user_id`) or None to refuse the connection.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import zmq
import zmq.asyncio

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ZapRequest:
    domain: str
    address: str
    mechanism: str
    credentials: tuple[bytes, ...]

    @property
    def ipc_uid(self) -> int | None:
        """The peer's uid on an ipc:// connection, else None."""
        parts = self.address.rsplit(":", 3)
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        return int(parts[1])

    @property
    def curve_key(self) -> bytes | None:
        return self.credentials[0] if self.mechanism == "CURVE" and self.credentials else None


def parse(frames: list[bytes]) -> ZapRequest | None:
    if len(frames) < 6 or frames[0] != b"1.0":
        return None
    try:
        domain, address, mech = (f.decode() for f in (frames[2], frames[3], frames[5]))
    except UnicodeDecodeError:
        return None
    return ZapRequest(domain, address, mech, tuple(frames[6:]))


class ZapServer:
    """Runs the ZAP handler of one asyncio context in its event loop."""

    def __init__(self, ctx: zmq.asyncio.Context, decide: Callable[[ZapRequest], str | None]):
        self.ctx, self.decide = ctx, decide
        self.sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.sock = self.ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            req = parse(frames)
            user = None
            try:
                user = self.decide(req) if req is not None else None
            except Exception:
                log.exception("ZAP policy failed; refusing the connection")
            version = frames[0] if frames else b"1.0"
            request_id = frames[1] if len(frames) > 1 else b""
            if user is None:
                reply = [version, request_id, b"400", b"refused", b"", b""]
            else:
                reply = [version, request_id, b"200", b"OK", user.encode(), b""]
            await self.sock.send_multipart(reply)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.sock is not None:
            self.sock.close()

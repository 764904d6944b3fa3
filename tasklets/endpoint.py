"""A task's client endpoint: a ROUTER on ipc:// (in the tenant's 0700 directory, socket mode 0600)
and optionally on tcp:// with CURVE. A ZAP policy admits, on ipc://, the owner's uid and root; on
tcp://, only the client public keys listed in the spec.

The requests it accepts are its pipeline's (`accepts`), plus CancelRequest. The handler gets each
request with a ClientChannel: `send` for messages before the final reply (a stream), which returns
False once the client has gone (ROUTER_MANDATORY: the send fails), so the handler can stop early,
and `cancelled`, set when the same client sends CancelRequest for that ref (answered `ok`, or
`unknown_task` when no such request of that client is in flight).

Guarantee: every request that decodes gets exactly one final reply, the handler's or an Error,
whatever the handler does (exceptions become INTERNAL errors); a message that does not decode gets
an Error. Admission: beyond `max_in_flight` concurrent requests, a request is answered `overloaded`
at once, before any tokenizing, so a flood costs the host as little as possible.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable

import zmq
import zmq.asyncio
from zmq.utils import z85

from ipc import codec, transport
from ipc.addresses import socket_path
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.messages import CancelRequest, Error, Message, Ok
from ipc.zap import ZapRequest, ZapServer

log = logging.getLogger("fmplex.endpoint")


class ClientChannel:
    """The requesting client, as a handler sees it: send before the final reply; cancellation."""

    def __init__(self, send: Callable[[Message], bool]):
        self._send = send
        self.cancelled = asyncio.Event()
        self.gone = False

    def send(self, msg: Message) -> bool:
        """False once the client has gone (the message is then dropped)."""
        if not self.gone and not self._send(msg):
            self.gone = True
        return not self.gone


Handler = Callable[[Message, ClientChannel], Awaitable[Message]]


class ClientEndpoint:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, owner_uid: int, handler: Handler,
                 accepts: frozenset[type], tcp: str = "", authorized_keys: tuple[str, ...] = (),
                 max_in_flight: int = 512):
        self.ctx, self.address, self.owner_uid, self.handler = ctx, address, owner_uid, handler
        self.accepts = frozenset(accepts) | {CancelRequest}
        self._channels: dict[tuple[bytes, int], ClientChannel] = {}     # requests in flight
        self.max_in_flight = max_in_flight
        self.tcp, self.authorized = tcp, {z85.decode(k) for k in authorized_keys}
        public, self._secret = zmq.curve_keypair() if tcp else (b"", b"")
        self.public_key = public.decode()
        self.in_flight = 0
        self._socks: list[zmq.asyncio.Socket] = []
        self._tasks: set[asyncio.Task] = set()
        self._zap: ZapServer | None = None

    def start(self) -> None:
        """Bind (after the task registered: the daemon creates the tenant directory)."""
        self._zap = ZapServer(self.ctx, self._admit)
        self._zap.start()
        path = socket_path(self.address)
        if os.path.exists(path):
            os.unlink(path)
        sock = transport.router(self.ctx, self.address, zap_domain=b"endpoint", max_msg_bytes=64 << 20)
        os.chmod(path, 0o600)
        self._socks.append(sock)
        if self.tcp:
            self._socks.append(transport.router(self.ctx, self.tcp, zap_domain=b"endpoint",
                                                curve_secret_key=self._secret, max_msg_bytes=64 << 20))
        loop = asyncio.get_running_loop()
        for s in self._socks:
            self._tasks.add(loop.create_task(self._serve(s)))

    def _admit(self, req: ZapRequest) -> str | None:
        if req.mechanism == "CURVE":
            return "curve" if req.curve_key in self.authorized else None
        uid = req.ipc_uid
        return str(uid) if uid is not None and uid in (self.owner_uid, 0) else None

    async def _serve(self, sock: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            env = await transport.recv(sock, router_side=True)
            try:
                msg = env.decode(self.accepts)
            except ProtocolError as e:
                self._send(sock, env.identity, Error(codec.peek_ref(env.frames), e.code, e.message))
                continue
            if isinstance(msg, CancelRequest):
                self._cancel(sock, env.identity, msg)
                continue
            if self.in_flight >= self.max_in_flight:
                self._send(sock, env.identity, Error(msg.ref, ErrorCode.OVERLOADED,
                                                     f"{self.in_flight} requests in flight"))
                continue
            self.in_flight += 1            # counted from acceptance, so the bound holds at once
            task = loop.create_task(self._answer(sock, env.identity, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, sock, identity: bytes, msg: Message) -> None:
        channel = ClientChannel(lambda m: self._send(sock, identity, m))
        key = (identity, msg.ref)
        self._channels[key] = channel
        try:
            reply = await self.handler(msg, channel)
        except FmplexError as e:
            reply = Error(msg.ref, e.code, e.message)
        except Exception as e:           # the guarantee: one reply, whatever happened
            log.exception("pipeline failed")
            reply = Error(msg.ref, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"[:500])
        finally:
            self.in_flight -= 1
            if self._channels.get(key) is channel:
                del self._channels[key]
        self._send(sock, identity, reply)

    def _cancel(self, sock, identity: bytes, msg: CancelRequest) -> None:
        channel = self._channels.get((identity, msg.ref))
        if channel is None:
            self._send(sock, identity, Error(msg.ref, ErrorCode.UNKNOWN_TASK,
                                             f"no request {msg.ref} of this client is in flight"))
            return
        channel.cancelled.set()
        self._send(sock, identity, Ok(ref=msg.ref, message="cancelling"))

    @staticmethod
    def _send(sock, identity: bytes, msg: Message) -> bool:
        try:
            transport.send(sock, msg, identity)
            return True
        except transport.PeerGone:
            return False      # the client left; there is nobody to tell
        except transport.PeerBusy:
            return True       # not reading right now: this message is dropped, the client lives

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in self._socks:
            s.close()
        if self._zap is not None:
            self._zap.close()

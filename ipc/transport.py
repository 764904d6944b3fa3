"""ZeroMQ transport helpers: socket factories with the project's options, send/receive of Messages,
liveness tracking and epochs.

Rules kept here (docs/protocol.md states them for other languages):
- ROUTER sockets set ROUTER_MANDATORY, so a send to a peer that is gone raises `PeerGone` instead
  of being dropped silently; a full peer pipe raises `PeerBusy`. Sends never block the loop.
- Every socket has bounded high-water marks, LINGER 0 and a MAXMSGSIZE (libzmq applies it per
  frame and drops the sender's connection before any Python code sees the frame; the codec caps a
  message at MAX_FRAMES frames).
- Liveness is an application heartbeat (`Liveness` tracks last-seen times); ZeroMQ's own heartbeat
  is answered by its I/O thread even when the application hangs, so it proves nothing.
- An epoch identifies a peer incarnation or session; a message with another epoch is refused.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio

from ipc import codec
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.messages import Message

DEFAULT_HWM = 10_000
DEFAULT_MAX_MSG_BYTES = 256 << 20


class PeerGone(FmplexError):
    """The ROUTER peer is not connected (ROUTER_MANDATORY said EHOSTUNREACH)."""

    def __init__(self, message: str = "peer is not connected"):
        super().__init__(ErrorCode.TASK_UNAVAILABLE, message)


class PeerBusy(FmplexError):
    """The peer's pipe is at its high-water mark; it is not reading."""

    def __init__(self, message: str = "peer pipe is full"):
        super().__init__(ErrorCode.OVERLOADED, message)


def _common(sock: zmq.Socket, hwm: int, max_msg_bytes: int) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    return sock


def router(ctx: zmq.Context, address: str, *, hwm: int = DEFAULT_HWM,
           max_msg_bytes: int = DEFAULT_MAX_MSG_BYTES, zap_domain: bytes | None = None,
           curve_secret_key: bytes | None = None) -> zmq.Socket:
    """A bound ROUTER with ROUTER_MANDATORY. zap_domain turns on ZAP authentication (see ipc.zap);
    curve_secret_key makes it a CURVE server (tcp:// endpoints)."""
    sock = _common(ctx.socket(zmq.ROUTER), hwm, max_msg_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if curve_secret_key is not None:
        sock.curve_server = True
        sock.curve_secretkey = curve_secret_key
    if zap_domain is not None:
        sock.zap_domain = zap_domain
    sock.bind(address)
    return sock


def dealer(ctx: zmq.Context, address: str, *, hwm: int = DEFAULT_HWM,
           max_msg_bytes: int = DEFAULT_MAX_MSG_BYTES, curve: tuple[bytes, bytes, bytes] | None = None,
           connect: bool = True, heartbeat_ms: int = 0) -> zmq.Socket:
    """A connected DEALER. curve = (server public, own public, own secret) for CURVE (tcp://).
    connect=False leaves the connect to the caller (e.g. after attaching a socket monitor, which
    reports only events after it is attached). heartbeat_ms > 0 turns on ZMTP heartbeats: a peer
    whose host vanished without closing the connection is dropped after 3 silent periods (the
    connection's liveness only: an application hang still needs the application's heartbeat)."""
    sock = _common(ctx.socket(zmq.DEALER), hwm, max_msg_bytes)
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    if heartbeat_ms > 0:
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
    if connect:
        sock.connect(address)
    return sock


def _send_error(e: zmq.ZMQError, identity) -> FmplexError:
    if e.errno == zmq.EHOSTUNREACH:
        return PeerGone(f"peer {bytes(identity or b'').hex()} is not connected")
    if e.errno == zmq.EAGAIN:
        return PeerBusy()
    return FmplexError(ErrorCode.INTERNAL, f"send failed: {e}")


def send(sock: zmq.Socket, msg: Message, identity: bytes | None = None) -> None:
    """Send without blocking. Raises PeerGone / PeerBusy (ROUTER) instead of dropping silently.

    On an asyncio socket the send goes through pyzmq's own API: with NOBLOCK it completes at once
    (the returned future is already done) and pyzmq re-arms its edge-triggered readers, which a
    send on a sync shadow of the socket would not do (a reader could then miss its wake-up)."""
    frames = codec.encode(msg)
    copy = len(frames) == 1          # tensor frames go zero-copy; a lone small header is copied
    if identity is not None:
        frames.insert(0, identity)
    try:
        result = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
    except zmq.ZMQError as e:
        raise _send_error(e, identity) from None
    if isinstance(result, asyncio.Future):
        if not result.done():                  # only if a blocking send were pending: never here
            raise FmplexError(ErrorCode.INTERNAL, "asyncio send did not complete at once")
        error = result.exception()
        if error is not None:
            raise _send_error(error, identity) if isinstance(error, zmq.ZMQError) else error


@dataclass(slots=True)
class Envelope:
    """A received multipart message before decoding: the sender's identity (ROUTER) and frames."""
    identity: bytes | None
    frames: list

    def decode(self, allowed: frozenset[type] | None = None) -> Message:
        return codec.decode(self.frames, allowed)

    def user_id(self) -> str | None:
        """The User-Id that ZAP attached to the sender's connection (see ipc.zap), if any."""
        try:
            return self.frames[0].get("User-Id") or None
        except (zmq.ZMQError, AttributeError, IndexError):
            return None

    def peer_uid(self) -> int | None:
        """The sender's uid, where the socket's ZAP policy records uids as User-Id."""
        uid = self.user_id()
        return int(uid) if uid is not None and uid.isdigit() else None


def _envelope(frames: list, router_side: bool) -> Envelope:
    if router_side:
        return Envelope(frames[0].bytes, frames[1:])
    return Envelope(None, frames)


async def recv(sock: zmq.asyncio.Socket, router_side: bool) -> Envelope:
    """Receive one multipart message (zero-copy frames). Decoding is the caller's next step, so a
    malformed message can still be answered to its sender.

    With a backlog, pyzmq hands back an already-finished future, and awaiting it does not yield:
    a receive loop would then starve every other coroutine (heartbeats, timers) until the socket
    runs dry. So a receive that completed at once yields to the loop first."""
    fut = sock.recv_multipart(copy=False)
    if fut.done():
        await asyncio.sleep(0)
    return _envelope(await fut, router_side)


def recv_sync(sock: zmq.Socket, router_side: bool) -> Envelope:
    return _envelope(sock.recv_multipart(copy=False), router_side)


def new_epoch() -> int:
    """A fresh random epoch in [1, 2**63): one per daemon incarnation and per task session."""
    return secrets.randbits(63) or 1


def check_epoch(got: int, expected: int) -> None:
    if got != expected:
        raise ProtocolError(ErrorCode.STALE_EPOCH, f"epoch {got} is not the current {expected}")


# Heartbeat rates (docs/protocol.md §10), in periods of `heartbeat_ms`. Tasks beat every period: a
# hung task must be noticed within liveness_ms. The daemon beats every DAEMON_BEAT_PERIODS and a
# task declares it lost after DAEMON_SILENCE_PERIODS of silence: a dead daemon shows at once as
# handle-plane EOF, so its heartbeats only catch a daemon alive but hung, and sparse ones keep
# hundreds of idle tasks cheap (and free of false alarms when the machine is saturated).
DAEMON_BEAT_PERIODS = 5
DAEMON_SILENCE_PERIODS = 25


class Liveness:
    """Last-seen times of peers; a peer unseen for `timeout_s` is expired. Pure: the caller passes
    the clock, so it is tested without sleeping."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._seen: dict[object, float] = {}

    def seen(self, peer, now: float | None = None) -> None:
        self._seen[peer] = time.monotonic() if now is None else now

    def forget(self, peer) -> None:
        self._seen.pop(peer, None)

    def expired(self, now: float | None = None) -> list:
        """Peers past the timeout; they are forgotten (each is reported once)."""
        now = time.monotonic() if now is None else now
        dead = [p for p, t in self._seen.items() if now - t > self.timeout_s]
        for p in dead:
            del self._seen[p]
        return dead


def request(sock: zmq.Socket, msg: Message, timeout_s: float, allowed=None) -> Message:
    """Blocking request/reply on a sync DEALER: send, wait for the reply with the same ref.
    Raises TimeoutError when none comes; an `Error` reply is returned as a message."""
    send(sock, msg)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000) + 1):
            raise TimeoutError(f"no reply to {msg.TYPE} within {timeout_s}s")
        reply = recv_sync(sock, False).decode(allowed)
        if getattr(reply, "ref", None) == getattr(msg, "ref", None):
            return reply

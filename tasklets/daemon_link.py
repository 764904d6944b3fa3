"""A task process's link to fmplexd: one DEALER on the task plane and one handle-plane connection,
carrying any number of sessions (a task's main version and its canary), told apart by epoch.

Requests: one reply each (`SessionCall.request`), or a stream of replies (`SessionCall.stream`:
a Generate's Tokens until the one carrying `finish`; leaving the stream early sends Cancel).

Lifecycle of a session: Register -> Registered(slot grant) -> OpenRegions over the handle plane
(slot fd, mapped read-write; the backbone fd is closed unmapped: a standard task never touches it)
-> write the extension into the granted half -> Commit -> Committed. Updates: PrepareUpdate ->
UpdateReady -> write -> Commit -> Committed. `lost` is set when the daemon stops answering
heartbeats, closes the handle plane, refuses our epoch or says it is shutting down; every pending
request then fails with DAEMON_UNAVAILABLE and the owner reconnects with a new link.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
import zmq
import zmq.asyncio

from ipc import transport
from ipc.addresses import RunDir
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.handles import HandleClient
from ipc.messages import (PROTOCOL_VERSION, Cancel, Command, Commit, Committed, Error,
                          ExtensionSpec, Heartbeat, Hello, OpenRegions, Output, PrepareUpdate,
                          Registered, Register, RegionsGranted, Result, Role, SlotGrant, Submit,
                          TaskConfig, Tokens, Unregister, UpdateReady, Welcome)
from ipc.shm import MappedRegion, store

log = logging.getLogger("fmplex.task")
SESSION_MESSAGES = (Result, Tokens, Committed, UpdateReady, Command, Heartbeat)   # carry an epoch
ADMISSION_MESSAGES = (Result, Tokens, Error)                  # may carry admission figures


class DaemonLost(FmplexError):
    def __init__(self, why: str):
        super().__init__(ErrorCode.DAEMON_UNAVAILABLE, f"lost the daemon: {why}")


@dataclass(slots=True, eq=False)
class Session:
    """One registered version of the task. Admission (flow control with the daemon): `sent`
    counts the requests sent or reserved in this session; the daemon's replies say how many it
    had received (`seen`) and how much room the queue had then (`room`), so
    `credit() = room - (sent - seen)` is a lower bound of the room the queue has now."""
    epoch: int
    config: TaskConfig
    spec: ExtensionSpec
    grant: SlotGrant
    region: MappedRegion
    version: int = 0
    sent: int = 0
    seen: int = 0
    room: int = 0

    def __post_init__(self) -> None:
        self.room = self.config.queue_limit

    def credit(self) -> int:
        return self.room - (self.sent - self.seen)

    def admitted(self, room: int, seen: int) -> None:
        """Admission figures from a reply (ignored if older than what we know)."""
        if seen >= self.seen:
            self.seen, self.room = seen, room


class SessionCall:
    """One session's requests on the link (what a pipeline sees): each request carries the
    session's epoch and a fresh ref; `task` names the variant the session serves.

    Admission: `reserve()` takes one credit of the session before any work is done for a client
    request (FmplexError OVERLOADED, at once, when it has none); the first request sent uses it,
    later ones count afresh; `release()` returns it if nothing was sent."""

    def __init__(self, link: "DaemonLink", session: Session, task: str):
        self.link, self.session, self.task = link, session, task
        self.reserved = False

    def reserve(self) -> None:
        s = self.session
        if s.credit() <= 0:
            raise FmplexError(ErrorCode.OVERLOADED, f"task {self.task} has {s.config.queue_limit} "
                              "requests queued in the daemon (its limit); refused before any work")
        s.sent += 1
        self.reserved = True

    def release(self) -> None:
        if self.reserved:
            self.reserved = False
            self.session.sent -= 1

    def _count(self) -> None:
        if self.reserved:
            self.reserved = False
        else:
            self.session.sent += 1

    async def request(self, cls: type, **fields):
        """One request, its one reply (an Error reply raises FmplexError)."""
        msg = cls(epoch=self.session.epoch, ref=next(self.link._refs), **fields)
        self._count()
        return await self.link._request(msg, timeout_s=None)

    def stream(self, cls: type, **fields) -> "Stream":
        """Send a streaming request (Generate); iterate the returned Stream for its replies."""
        msg = cls(epoch=self.session.epoch, ref=next(self.link._refs), **fields)
        self._count()
        return Stream(self.link, msg)


class Stream:
    """The replies of one streaming request: `async for tokens in stream` yields each Tokens until
    the one with `finish` (an Error reply raises FmplexError; a lost daemon, DaemonLost).
    `cancel()` asks the daemon to stop (the stream then ends with finish = cancelled); leaving the
    stream early (`close()`, or the consumer being cancelled) cancels too."""

    def __init__(self, link: "DaemonLink", msg):
        self.link, self.msg = link, msg
        self.finished = self.cancel_sent = False
        self._queue: asyncio.Queue = asyncio.Queue()
        link._streams[msg.ref] = self._queue
        try:
            link._send_checked(msg)
        except BaseException:
            link._streams.pop(msg.ref, None)
            raise

    def __aiter__(self):
        return self

    async def __anext__(self) -> Tokens:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:
            self.close()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            self.link._streams.pop(self.msg.ref, None)
            raise item
        if isinstance(item, Error):
            self.finished = True
            self.link._streams.pop(self.msg.ref, None)
            raise FmplexError(item.code, item.message)
        if item.finish is not None:
            self.finished = True
            self.link._streams.pop(self.msg.ref, None)
        return item

    def cancel(self) -> None:
        """Ask the daemon to stop generating (frees its KV); the final Tokens still comes."""
        if not self.finished and not self.cancel_sent and not self.link.lost.is_set():
            self.cancel_sent = True
            try:
                self.link._send_checked(Cancel(epoch=self.msg.epoch, ref=self.msg.ref))
            except FmplexError:
                pass

    def close(self) -> None:
        """Stop listening; the daemon is told to stop if the stream had not finished."""
        if not self.finished:
            self.cancel()
            self.finished = True
        self.link._streams.pop(self.msg.ref, None)


class DaemonLink:
    def __init__(self, run_dir: RunDir, on_command: Callable[[Session, Command], Awaitable] | None = None):
        self.run_dir, self.on_command = run_dir, on_command
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self.handles: HandleClient | None = None
        self.sessions: dict[int, Session] = {}
        self.welcome: Welcome | None = None
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._refs = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._streams: dict[int, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._last_heard = time.monotonic()

    # -- connection ---------------------------------------------------------------------------

    async def open(self, timeout_s: float = 30.0) -> Welcome:
        """Connect and handshake, retrying until the daemon answers or timeout_s passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.handles = HandleClient(self.run_dir.handles)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise DaemonLost(f"no handle plane at {self.run_dir.handles} ({e})") from None
                await asyncio.sleep(0.05)
        self.sock = transport.dealer(self.ctx, self.run_dir.tasks)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._reader()))
        loop.add_reader(self.handles.sock.fileno(), self._handle_plane_readable)
        while True:
            try:
                self.welcome = await self._request(
                    Hello(ref=next(self._refs), proto=PROTOCOL_VERSION, role=Role.TASK,
                          pid=os.getpid()), timeout_s=0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise DaemonLost("no Welcome from the daemon") from None
        self._last_heard = time.monotonic()
        self._tasks.append(loop.create_task(self._heartbeats(self.welcome.heartbeat_ms / 1e3)))
        return self.welcome

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_pending("link closed")
        if self.handles is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.handles.sock.fileno())
            except (ValueError, OSError):
                pass
            self.handles.close()
        for s in self.sessions.values():
            s.region.close()
        self.sessions.clear()
        if self.sock is not None:
            self.sock.close()
        self.ctx.term()

    # -- sessions -----------------------------------------------------------------------------

    async def register(self, config: TaskConfig, spec: ExtensionSpec, tensors: dict[str, np.ndarray],
                       endpoint: str = "", tcp_endpoint: str = "", server_key: str = "") -> Session:
        reg: Registered = await self._request(Register(
            ref=next(self._refs), proto=PROTOCOL_VERSION, task=config, extension=spec, pid=os.getpid(), endpoint=endpoint,
            tcp_endpoint=tcp_endpoint, server_key=server_key))
        session = Session(reg.epoch, config, spec, reg.slot, self._map_slot(reg.slot))
        self.sessions[reg.epoch] = session
        await self._write_and_commit(session, reg.slot, spec, tensors)
        return session

    async def update(self, session: Session, spec: ExtensionSpec, tensors: dict[str, np.ndarray]) -> int:
        ready: UpdateReady = await self._request(PrepareUpdate(
            epoch=session.epoch, ref=next(self._refs), extension=spec))
        if ready.slot.generation != session.grant.generation:    # a new layout: a new region
            old = session.region
            session.region = self._map_slot(ready.slot)
            old.close()
        await self._write_and_commit(session, ready.slot, spec, tensors)
        return session.version

    async def unregister(self, session: Session) -> None:
        self.sessions.pop(session.epoch, None)
        try:
            await self._request(Unregister(epoch=session.epoch, ref=next(self._refs)), timeout_s=2.0)
        finally:
            session.region.close()

    async def submit(self, session: Session, output: Output, ids: np.ndarray, lengths: list[int],
                     deadline_ms: int, type_ids: np.ndarray | None = None) -> Result:
        return await SessionCall(self, session, session.config.name).request(
            Submit, output=output, lengths=lengths, ids=ids, type_ids=type_ids,
            deadline_ms=deadline_ms)

    def reply(self, msg) -> None:
        """Answer the daemon (e.g. a relayed Command)."""
        transport.send(self.sock, msg)

    def notify(self, msg) -> None:
        """Tell the daemon something that needs no answer (CacheStats); DaemonLost if lost."""
        self._send_checked(msg)

    # -- internals ----------------------------------------------------------------------------

    def _map_slot(self, grant: SlotGrant) -> MappedRegion:
        reply, fds = self.handles.request(OpenRegions(ref=next(self._refs), token=grant.token))
        try:
            if isinstance(reply, Error):
                raise FmplexError(reply.code, reply.message)
            if not isinstance(reply, RegionsGranted) or len(fds) != 2:
                raise FmplexError(ErrorCode.INTERNAL, "unexpected handle-plane reply")
            return MappedRegion(fds[1], reply.slot_size, writable=True)
        finally:
            for fd in fds:          # a standard task never maps the backbone (fds[0])
                os.close(fd)

    async def _write_and_commit(self, session: Session, grant: SlotGrant, spec: ExtensionSpec,
                                tensors: dict[str, np.ndarray]) -> None:
        base = grant.half * grant.half_bytes
        for entry in grant.entries:
            store(session.region.array(entry, base), tensors[entry.name], entry.dtype)
        done: Committed = await self._request(Commit(epoch=session.epoch, ref=next(self._refs),
                                                     generation=grant.generation, half=grant.half))
        session.grant, session.spec, session.version = grant, spec, done.version

    async def _request(self, msg, timeout_s: float | None = 10.0):
        if self.lost.is_set():
            raise DaemonLost(self.lost_reason)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg.ref] = fut
        try:
            transport.send(self.sock, msg)
            reply = await (asyncio.wait_for(fut, timeout_s) if timeout_s else fut)
        finally:
            self._pending.pop(msg.ref, None)
        if isinstance(reply, Error):
            raise FmplexError(reply.code, reply.message)
        return reply

    async def _reader(self) -> None:
        while True:
            env = await transport.recv(self.sock, router_side=False)
            try:
                self._dispatch(env.decode())
            except ProtocolError as e:
                log.warning("dropping a malformed message from the daemon: %s", e)
            except Exception:                      # never let one message kill the link
                log.exception("failed to handle a message from the daemon")

    def _send_checked(self, msg) -> None:
        if self.lost.is_set():
            raise DaemonLost(self.lost_reason)
        transport.send(self.sock, msg)

    def _dispatch(self, msg) -> None:
        self._last_heard = time.monotonic()
        if isinstance(msg, SESSION_MESSAGES) and msg.epoch not in self.sessions:
            return                                          # stale: an ended session's traffic
        if isinstance(msg, ADMISSION_MESSAGES) and msg.seen:
            session = self.sessions.get(msg.epoch)
            if session is not None:
                session.admitted(msg.room, msg.seen)
        stream = self._streams.get(getattr(msg, "ref", -1)) if isinstance(msg, (Tokens, Error)) \
            else None
        if stream is not None:
            stream.put_nowait(msg)
            return
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, Command):
            if self.on_command is not None:
                asyncio.get_running_loop().create_task(self.on_command(self.sessions[msg.epoch], msg))
            return
        if isinstance(msg, Error) and msg.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.STALE_EPOCH) \
                and msg.ref not in self._pending:
            self._mark_lost(msg.message)
            return
        fut = self._pending.get(getattr(msg, "ref", -1))
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _heartbeats(self, period: float) -> None:
        seq = itertools.count(1)
        timeout = transport.DAEMON_SILENCE_PERIODS * period
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - last_tick > 2 * period:       # our own loop stalled: give the reader a turn
                self._last_heard = max(self._last_heard, now - period)
            last_tick = now
            for s in list(self.sessions.values()):
                try:
                    transport.send(self.sock, Heartbeat(epoch=s.epoch, seq=next(seq)))
                except FmplexError:
                    pass
            if self.sessions and time.monotonic() - self._last_heard > timeout:
                self._mark_lost(f"no heartbeat for {timeout:.1f}s")

    def _handle_plane_readable(self) -> None:
        try:
            data = self.handles.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.handles.sock.fileno())
            self._mark_lost("handle plane closed")

    def _mark_lost(self, why: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = why
            self.lost.set()
            self._fail_pending(why)

    def _fail_pending(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(DaemonLost(why))
        for queue in self._streams.values():
            queue.put_nowait(DaemonLost(why))

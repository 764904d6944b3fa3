"""The controller's socket: routes for clients, commands for operators (docs/protocol.md §17).

One ROUTER on a fixed tcp:// address with CURVE (the service's key pair stays the same across
controller restarts, so clients keep their configuration), served by an asyncio loop in its own
thread. ZAP admits a connection whose CURVE key is an operator's (User-Id "operator") or a
client's ("client"); any other key is refused during the handshake.

    route_query   -> route_table     anyone admitted; a long poll with wait_ms (see RouteQuery)
    cluster_deploy / cluster_remove / cluster_status -> ok / cluster_status_reply
                                     operators only (else `unauthorized`); answered by the
                                     controller's `operate(msg)`, called on this thread
Every decoded request gets exactly one reply; a malformed one gets an `error`.

The controller publishes each new route snapshot with `publish` (from any thread); waiting long
polls are re-examined then, and answered when satisfied or when their wait ends. Until the first
snapshot (a restarted controller that has not heard from every host yet) every route query waits,
at least STARTING_WAIT_S, and is answered `daemon_unavailable` if none comes: a client never gets
a partial table.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils import z85

from ipc import aio, codec, transport
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.messages import (ClusterDeploy, ClusterRemove, ClusterStatus, Error, Message, Route,
                          RouteEndpoint, RouteQuery, RouteTable)
from ipc.zap import ZapRequest, ZapServer

log = logging.getLogger("fmplex.cluster.service")
OPERATOR, CLIENT = "operator", "client"
STARTING_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class Routes:
    """One version of the route table: every cluster task -> its serving replicas."""
    version: int
    routes: dict[str, tuple[RouteEndpoint, ...]]

    def answer(self, q: RouteQuery) -> RouteTable:
        names = q.tasks or sorted(self.routes)
        return RouteTable(ref=q.ref, version=self.version,
                          routes=[Route(t, list(self.routes[t]))
                                  for t in names if t in self.routes])

    def satisfies(self, q: RouteQuery) -> bool:
        """Every asked task has an endpoint the client did not say failed (a task not in the
        table yet, e.g. deployed a moment ago, is waited for too)."""
        return all(any(e.address not in q.avoid for e in self.routes.get(t, ())) for t in q.tasks)


class Service:
    ACCEPTED = frozenset({RouteQuery, ClusterDeploy, ClusterRemove, ClusterStatus})
    OPERATOR_ONLY = (ClusterDeploy, ClusterRemove, ClusterStatus)

    def __init__(self, bind: str, public: str, secret: str, operator_keys: tuple[str, ...],
                 client_keys: tuple[str, ...], operate: Callable[[Message], Message]):
        self.bind, self.operate = bind, operate
        self._secret = secret.encode()
        self.public = public
        self._keys = {**{z85.decode(k): CLIENT for k in client_keys},
                      **{z85.decode(k): OPERATOR for k in operator_keys}}
        self.routes: Routes | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fmplex-service", daemon=True)
        self._stop: asyncio.Event | None = None
        self.waiting = 0                      # long polls in progress (status, tests)

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind and serve; returns once bound (raises what binding raised)."""
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError("the cluster service did not start")
        if self._error is not None:
            raise self._error

    def publish(self, routes: Routes) -> None:
        """A new route snapshot (thread-safe)."""
        self.routes = routes
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake)

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            aio.run(self._main())
        except BaseException as e:            # noqa: BLE001 - reported to start() or logged
            if not self._started.is_set():
                self._error = e
                self._started.set()
            else:
                log.exception("the cluster service stopped")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed, self._stop = asyncio.Event(), asyncio.Event()
        ctx = zmq.asyncio.Context()
        zap = ZapServer(ctx, self._admit)
        zap.start()
        sock = transport.router(ctx, self.bind, zap_domain=b"cluster",
                                curve_secret_key=self._secret, max_msg_bytes=4 << 20)
        self._started.set()
        serve = self._loop.create_task(self._serve(sock))
        await self._stop.wait()
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)
        sock.close(linger=0)
        zap.close()
        ctx.term()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _admit(self, req: ZapRequest) -> str | None:
        return self._keys.get(req.curve_key) if req.mechanism == "CURVE" else None

    async def _serve(self, sock: zmq.asyncio.Socket) -> None:
        pending: set[asyncio.Task] = set()
        while True:
            env = await transport.recv(sock, router_side=True)
            try:
                msg = env.decode(self.ACCEPTED)
            except ProtocolError as e:
                _send(sock, env.identity, Error(codec.peek_ref(env.frames), e.code, e.message))
                continue
            if isinstance(msg, RouteQuery):
                if self._ready(msg):
                    _send(sock, env.identity, self.routes.answer(msg))
                    continue
                task = asyncio.get_running_loop().create_task(
                    self._long_poll(sock, env.identity, msg))
                pending.add(task)
                task.add_done_callback(pending.discard)
                continue
            _send(sock, env.identity, self._operate(msg, env.user_id()))

    def _operate(self, msg: Message, user: str | None) -> Message:
        if user != OPERATOR:
            return Error(msg.ref, ErrorCode.UNAUTHORIZED, f"{msg.TYPE} is for operators")
        try:
            return self.operate(msg)
        except FmplexError as e:
            return Error(msg.ref, e.code, e.message)
        except Exception as e:                # noqa: BLE001 - one reply, whatever happened
            log.exception("%s failed", msg.TYPE)
            return Error(msg.ref, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"[:500])

    def _ready(self, q: RouteQuery) -> bool:
        return self.routes is not None and (not q.wait_ms or self.routes.satisfies(q))

    async def _long_poll(self, sock, identity: bytes, q: RouteQuery) -> None:
        """Answer when the routes satisfy the query or its wait ends."""
        loop = asyncio.get_running_loop()
        wait_s = q.wait_ms / 1e3
        if self.routes is None:
            wait_s = max(wait_s, STARTING_WAIT_S)
        deadline = loop.time() + wait_s
        self.waiting += 1
        try:
            while not self._ready(q) and (left := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    break
        finally:
            self.waiting -= 1
        routes = self.routes
        _send(sock, identity, routes.answer(q) if routes is not None else Error(
            q.ref, ErrorCode.DAEMON_UNAVAILABLE, "the cluster controller is starting"))


def _send(sock, identity: bytes, msg: Message) -> None:
    try:
        transport.send(sock, msg, identity)
    except (transport.PeerGone, transport.PeerBusy):
        pass                                  # the client left or does not read: nobody to tell

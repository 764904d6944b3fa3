"""The Python client library: sync `Client` and asyncio `AsyncClient`.

    with Client() as c:                                   # run dir: FMPLEX_RUN_DIR or the default
        reply = c.infer("sentiment", ["what a great day"])
        reply.labels[0][0].label, reply.labels[0][0].score
        c.infer_images("scenes", [open("photo.jpg", "rb").read()]).labels     # vision tasks
        c.infer_series("co2", values, horizon=96).forecast                    # (n, 96, quantiles)

    with Client() as c:                                   # a text-generation task
        c.generate("chat", messages=[{"role": "user", "content": "Hi!"}]).text
        for part in c.stream("chat", prompt="Once upon a time"):   # TextDelta..., GenerateReply
            print(getattr(part, "text", ""), end="")

Tasks are found by name through the daemon's control socket (Resolve), then each call goes to the
task's own endpoint. Given a cluster (`Client(cluster="tcp://HOST:PORT", cluster_key=...,
keypair=...)`), tasks are found through the cluster controller's routing service instead and
calls go to the tcp:// + CURVE endpoints of their replicas (fmplex/routing.py: spreading over
replicas, one failover on a lost host). Failures raise typed errors (ipc.errors):
OverloadedError, RequestTimeout (also raised client-side when no reply comes within the
timeout), TaskUnavailable / DaemonUnavailable (peer dead), UnknownTask, InvalidRequest,
Unauthorized.
`infer_many` pipelines several calls on one connection (batched calls).

A call never hangs on a dead task: each task connection is watched by a ZeroMQ socket monitor; a
disconnect while calls are outstanding fails them at once with TaskUnavailable, and a call to a
task whose connection is down (its process dead and not yet restarted) waits at most
CONNECT_GRACE_S for it to come back, then fails with TaskUnavailable instead of queueing for a
process that may not exist. The connection re-establishes itself when the task's process is
restarted; later calls then succeed.
"""
from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from fmplex.routing import HEARTBEAT_MS, ClusterAccess, Router
from ipc import transport
from ipc.addresses import RunDir, default_run_dir
from ipc.errors import (ErrorCode, FmplexError, ProtocolError, RequestTimeout, TaskUnavailable,
                        error_for)
from ipc.messages import (PROTOCOL_VERSION, CancelRequest, ChatMessage, Endpoint, Error,
                          ForecastReply, GenerateReply, GenerateText, Infer, InferImages,
                          InferReply, InferSeries, Message, Resolve, TextDelta)

DEFAULT_TIMEOUT_S = 30.0
WATCHED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
CONNECT_GRACE_S = 1.0          # a restarting task (0.1 s backoff first) is usually back by then


def _context(kind=zmq.Context):
    """A ZeroMQ context for a client that may talk to many tasks at once: each connection is
    a socket and its monitor, so libzmq's default of 1,023 sockets ran out at about 340 tasks.
    Its limit is raised to libzmq's own (file descriptors are then the bound)."""
    ctx = kind()
    ctx.max_sockets = ctx.get(zmq.SOCKET_LIMIT)
    return ctx


def _unavailable(task: str) -> TaskUnavailable:
    return TaskUnavailable(ErrorCode.TASK_UNAVAILABLE, f"task {task} has no connected process "
                           f"(not back within {CONNECT_GRACE_S}s; restarting or removed)")


class _Link:
    """A task connection of the sync Client and what its monitor said last."""

    def __init__(self, ctx: zmq.Context, address: str, curve: tuple[bytes, bytes, bytes] | None = None,
                 heartbeat_ms: int = 0):
        self.sock = transport.dealer(ctx, address, connect=False, curve=curve,
                                     heartbeat_ms=heartbeat_ms)
        self.monitor, self.connected = self.sock.get_monitor_socket(WATCHED), False
        self.sock.connect(address)               # after the monitor: it sees CONNECTED

    def drain(self) -> bool:
        """Read the monitor's events; True if a disconnect was among them."""
        seen = False
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected, seen = False, True
        return seen

    def wait_connected(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        self.drain()
        while not self.connected:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.monitor.poll(int(left * 1000) + 1):
                self.drain()
        return True

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def _raise_if_error(reply: Message) -> Message:
    if isinstance(reply, Error):
        raise error_for(reply.code, reply.message)
    return reply


def generate_request(ref: int, prompt: str | None = None, messages=None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None,
                     seed: int | None = None, stop: list[str] | None = None,
                     stop_token_ids: list[int] | None = None, stream: bool = False,
                     ignore_eos: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> GenerateText:
    """A GenerateText; `messages` may be ChatMessage objects or {"role", "content"} dicts."""
    chat = None if messages is None else [
        m if isinstance(m, ChatMessage) else ChatMessage(role=m["role"], content=m["content"])
        for m in messages]
    return GenerateText(ref=ref, prompt=prompt, messages=chat, max_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                        stop=list(stop) if stop is not None else None,
                        stop_token_ids=list(stop_token_ids) if stop_token_ids else None,
                        stream=stream, ignore_eos=ignore_eos,
                        timeout_ms=int(timeout_s * 1000), proto=PROTOCOL_VERSION)


class Client:
    def __init__(self, run_dir: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 cluster: str | None = None, cluster_key: str = "",
                 keypair: tuple[str, str] | None = None):
        """cluster: the controller's service (tcp://HOST:PORT), its CURVE public key and this
        client's key pair (Z85 public, secret); then tasks resolve through the cluster."""
        self.run_dir = RunDir(run_dir or default_run_dir())
        self.timeout_s = timeout_s
        self.ctx = _context()
        self._control: zmq.Socket | None = None
        self._tasks: dict[str, _Link] = {}
        self._refs = itertools.count(1)
        self.router: Router | None = None
        if cluster is not None:
            access = ClusterAccess(cluster, cluster_key, *(keypair or ("", "")))
            self.router = Router(self.ctx, access,
                                 lambda address, curve: _Link(self.ctx, address, curve, HEARTBEAT_MS))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for link in self._tasks.values():
            link.close()
        if self.router is not None:
            self.router.close()
        if self._control is not None:
            self._control.close(linger=0)
        self.ctx.destroy(linger=0)            # every socket of this client, then the context

    def ref(self) -> int:
        return next(self._refs)

    def control(self, msg: Message, timeout_s: float | None = None) -> Message:
        """One request/reply on the daemon's control socket; Error replies raise."""
        if self._control is None:
            self._control = transport.dealer(self.ctx, self.run_dir.control)
        return _raise_if_error(self._rpc(self._control, msg, timeout_s or self.timeout_s))

    def endpoint(self, task: str) -> Endpoint:
        return self.control(Resolve(ref=self.ref(), name=task))

    def infer(self, task: str, texts: list[str], pairs: list[str] | None = None, top_k: int = 0,
              timeout_s: float | None = None) -> InferReply:
        return self.infer_many(task, [texts], [pairs] if pairs else None, top_k, timeout_s)[0]

    def infer_many(self, task: str, batches: list[list[str]], pairs: list[list[str]] | None = None,
                   top_k: int = 0, timeout_s: float | None = None) -> list[InferReply]:
        """Send every batch at once on the task's connection, then collect the replies in order.
        Raises the first error (typed) after all replies are in or the timeout passes."""
        timeout_s = timeout_s or self.timeout_s
        msgs = [Infer(ref=self.ref(), texts=list(b), pairs=list(pairs[i]) if pairs else None,
                      top_k=top_k, timeout_ms=int(timeout_s * 1000), proto=PROTOCOL_VERSION)
                for i, b in enumerate(batches)]
        return self.calls(task, msgs, timeout_s)

    def infer_images(self, task: str, images: list[bytes], top_k: int = 0,
                     timeout_s: float | None = None) -> InferReply:
        """Encoded images (PNG, JPEG, ... file contents) through a vision task."""
        timeout_s = timeout_s or self.timeout_s
        return self.calls(task, [InferImages(ref=self.ref(), images=list(images), top_k=top_k,
                                             timeout_ms=int(timeout_s * 1000),
                                             proto=PROTOCOL_VERSION)], timeout_s)[0]

    def infer_series(self, task: str, values, horizon: int = 0,
                     quantiles: list[float] | None = None, top_k: int = 0,
                     timeout_s: float | None = None) -> ForecastReply | InferReply:
        """Series (n, T) or one series (T,) through a time-series task (NaN = missing): a
        ForecastReply from a forecasting task, an InferReply (labels) from a classifier."""
        timeout_s = timeout_s or self.timeout_s
        return self.calls(task, [series_request(self.ref(), values, horizon, quantiles, top_k,
                                                timeout_s)], timeout_s)[0]

    def calls(self, task: str, msgs: list[Message], timeout_s: float) -> list[Message]:
        """Send requests at once on the task's connection (in a cluster: a replica's, with one
        failover), collect the replies in order. Raises the first error (typed) after all
        replies are in or the timeout passes."""
        if self.router is not None:
            return self.router.call(task, timeout_s,
                                    lambda link, left: self._calls_on(link, task, msgs, left))
        return self._calls_on(self._task_link(task), task, msgs, timeout_s)

    def _calls_on(self, link: "_Link", task: str, msgs: list[Message], timeout_s: float
                  ) -> list[Message]:
        if not link.wait_connected(min(timeout_s, CONNECT_GRACE_S)):  # (old events: state only)
            raise _unavailable(task)
        for m in msgs:
            transport.send(link.sock, m)
        replies = self._collect(link.sock, {m.ref for m in msgs}, timeout_s, link=link)
        if replies is None:
            raise TaskUnavailable(ErrorCode.TASK_UNAVAILABLE,
                                  f"task {task} went away with {len(msgs)} call(s) in flight")
        out = []
        for m in msgs:
            if m.ref not in replies:
                raise RequestTimeout(ErrorCode.TIMEOUT, f"no reply from {task} within {timeout_s}s")
            out.append(_raise_if_error(replies[m.ref]))
        return out

    def generate(self, task: str, prompt: str | None = None, messages=None,
                 timeout_s: float | None = None, **sampling) -> GenerateReply:
        """Generate with a text-generation task; returns the final GenerateReply (text, token ids,
        counts, finish reason). `sampling`: max_tokens, temperature, top_p, top_k, seed, stop,
        stop_token_ids, ignore_eos (unset = the task's defaults)."""
        reply = None
        for part in self._generation(task, prompt, messages, timeout_s, False, sampling):
            reply = part
        return reply

    def stream(self, task: str, prompt: str | None = None, messages=None,
               timeout_s: float | None = None, **sampling):
        """Like generate, streaming: yields TextDelta messages as tokens come, then the final
        GenerateReply. Leaving the loop early cancels the generation."""
        return self._generation(task, prompt, messages, timeout_s, True, sampling)

    def _generation(self, task, prompt, messages, timeout_s, stream: bool, sampling: dict):
        timeout_s = timeout_s or self.timeout_s
        link = self._task_link(task)
        msg = generate_request(self.ref(), prompt, messages, stream=stream, timeout_s=timeout_s,
                               **sampling)
        if not link.wait_connected(min(timeout_s, CONNECT_GRACE_S)):
            raise _unavailable(task)
        transport.send(link.sock, msg)
        done = False
        try:
            for reply in self._replies(link, msg.ref, time.monotonic() + timeout_s, task):
                if isinstance(reply, GenerateReply):
                    done = True
                    yield reply
                    return
                if isinstance(reply, TextDelta):
                    if stream:
                        yield reply
                    continue
                done = True
                _raise_if_error(reply)
        finally:
            if not done:                     # abandoned (timeout, caller left): stop it
                try:
                    transport.send(link.sock, CancelRequest(ref=msg.ref))
                except FmplexError:
                    pass

    @staticmethod
    def _replies(link: _Link, ref: int, deadline: float, task: str):
        """Messages answering `ref` until the deadline (RequestTimeout) or a disconnect."""
        poller = zmq.Poller()
        poller.register(link.sock, zmq.POLLIN)
        poller.register(link.monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            events = dict(poller.poll(max(1, int(left * 1000)))) if left > 0 else {}
            if not events:
                raise RequestTimeout(ErrorCode.TIMEOUT, f"no reply from {task} in time")
            if link.sock in events:
                reply = transport.recv_sync(link.sock, router_side=False).decode()
                if getattr(reply, "ref", None) == ref:
                    yield reply
            elif link.drain():
                raise TaskUnavailable(ErrorCode.TASK_UNAVAILABLE, f"task {task} went away")

    def _task_link(self, task: str) -> _Link:
        link = self._tasks.get(task)
        if link is None:
            link = self._tasks[task] = _Link(self.ctx, self.endpoint(task).address)
        return link

    def _rpc(self, sock: zmq.Socket, msg: Message, timeout_s: float) -> Message:
        replies = self._collect(sock, {msg.ref}, timeout_s, send=msg)
        if msg.ref not in replies:
            raise RequestTimeout(ErrorCode.TIMEOUT, f"no reply to {msg.TYPE} within {timeout_s}s")
        return replies[msg.ref]

    @staticmethod
    def _collect(sock: zmq.Socket, refs: set[int], timeout_s: float, send: Message | None = None,
                 link: _Link | None = None) -> dict[int, Message] | None:
        """Replies by ref until all are in or time is up; None if the peer disconnected first."""
        if send is not None:
            transport.send(sock, send)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if link is not None:
            poller.register(link.monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        replies: dict[int, Message] = {}
        while len(replies) < len(refs):
            left = deadline - time.monotonic()
            events = dict(poller.poll(max(1, int(left * 1000)))) if left > 0 else {}
            if not events:
                break
            if sock in events:
                reply = transport.recv_sync(sock, router_side=False).decode()
                if getattr(reply, "ref", None) in refs:   # late replies of earlier calls are dropped
                    replies[reply.ref] = reply
            elif link is not None and link.drain():
                return None
        return replies


class AsyncClient:
    """asyncio twin of Client; many calls may be in flight on one connection."""

    def __init__(self, run_dir: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.run_dir = RunDir(run_dir or default_run_dir())
        self.timeout_s = timeout_s
        self.ctx = _context(zmq.asyncio.Context)
        self._socks: dict[str, tuple[zmq.asyncio.Socket, list[asyncio.Task]]] = {}
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._streams: dict[int, tuple[str, asyncio.Queue]] = {}     # ref -> (task, its replies)
        self._up: dict[str, asyncio.Event] = {}           # task -> connected (from its monitor)
        self._refs = itertools.count(1)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        for sock, tasks in self._socks.values():
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sock.close(linger=0)
        self._socks.clear()
        # destroy, not term: a monitor whose watcher was cancelled before it ever ran is closed
        # here too (term would wait for it forever)
        self.ctx.destroy(linger=0)

    def ref(self) -> int:
        """A fresh request id (for messages built by the caller, e.g. control requests)."""
        return next(self._refs)

    async def control(self, msg: Message, timeout_s: float | None = None) -> Message:
        return await self._call("", self.run_dir.control, msg, timeout_s)

    async def infer(self, task: str, texts: list[str], pairs: list[str] | None = None,
                    top_k: int = 0, timeout_s: float | None = None) -> InferReply:
        timeout_s = timeout_s or self.timeout_s
        return await self.task_call(task, Infer(
            ref=next(self._refs), texts=list(texts), pairs=list(pairs) if pairs else None,
            top_k=top_k, timeout_ms=int(timeout_s * 1000), proto=PROTOCOL_VERSION), timeout_s)

    async def infer_images(self, task: str, images: list[bytes], top_k: int = 0,
                           timeout_s: float | None = None) -> InferReply:
        timeout_s = timeout_s or self.timeout_s
        return await self.task_call(task, InferImages(
            ref=next(self._refs), images=list(images), top_k=top_k,
            timeout_ms=int(timeout_s * 1000), proto=PROTOCOL_VERSION), timeout_s)

    async def infer_series(self, task: str, values, horizon: int = 0,
                           quantiles: list[float] | None = None, top_k: int = 0,
                           timeout_s: float | None = None) -> ForecastReply | InferReply:
        timeout_s = timeout_s or self.timeout_s
        return await self.task_call(task, series_request(next(self._refs), values, horizon,
                                                         quantiles, top_k, timeout_s), timeout_s)

    async def task_call(self, task: str, msg: Message, timeout_s: float) -> Message:
        """One request to a task's endpoint (resolved on first use); Error replies raise."""
        await self._connected(task, timeout_s)
        return await self._call(task, None, msg, timeout_s)

    async def generate(self, task: str, prompt: str | None = None, messages=None,
                       timeout_s: float | None = None, **sampling) -> GenerateReply:
        """See Client.generate."""
        reply = None
        async for part in self._generation(task, prompt, messages, timeout_s, False, sampling):
            reply = part
        return reply

    def stream(self, task: str, prompt: str | None = None, messages=None,
               timeout_s: float | None = None, **sampling):
        """See Client.stream: an async iterator of TextDelta, then the GenerateReply."""
        return self._generation(task, prompt, messages, timeout_s, True, sampling)

    async def _generation(self, task, prompt, messages, timeout_s, stream: bool, sampling: dict):
        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        await self._connected(task, timeout_s)
        msg = generate_request(next(self._refs), prompt, messages, stream=stream,
                               timeout_s=timeout_s, **sampling)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[msg.ref] = (task, queue)
        sock, done = self._socks[task][0], False
        try:
            transport.send(sock, msg)
            while True:
                left = deadline - time.monotonic()
                try:
                    reply = await asyncio.wait_for(queue.get(), max(left, 0.001))
                except asyncio.TimeoutError:
                    raise RequestTimeout(ErrorCode.TIMEOUT, f"no reply from {task} in time") from None
                if isinstance(reply, BaseException):
                    raise reply
                if isinstance(reply, TextDelta):
                    if stream:
                        yield reply
                    continue
                done = True
                yield _raise_if_error(reply)
                return
        finally:
            self._streams.pop(msg.ref, None)
            if not done:                     # abandoned (timeout, caller left): stop it
                try:
                    transport.send(sock, CancelRequest(ref=msg.ref))
                except FmplexError:
                    pass

    async def _connected(self, task: str, timeout_s: float) -> None:
        """Resolve and connect to the task's endpoint (a dead one fails within CONNECT_GRACE_S)."""
        if task not in self._socks:
            ep = await self.control(Resolve(ref=next(self._refs), name=task))
            self._open(task, ep.address, watch=True)
        up = self._up.get(task)
        if up is not None and not up.is_set():
            try:
                await asyncio.wait_for(up.wait(), min(timeout_s, CONNECT_GRACE_S))
            except asyncio.TimeoutError:
                raise _unavailable(task) from None

    def _open(self, key: str, address: str, watch: bool = False) -> zmq.asyncio.Socket:
        if key in self._socks:                     # opened meanwhile by a concurrent call
            return self._socks[key][0]
        sock = transport.dealer(self.ctx, address, connect=False)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._reader(sock))]
        if watch:                                  # the monitor first: it sees CONNECTED
            self._up[key] = asyncio.Event()
            tasks.append(loop.create_task(self._watch(key, sock.get_monitor_socket(WATCHED))))
        sock.connect(address)
        self._socks[key] = (sock, tasks)
        return sock

    async def _call(self, key: str, address: str | None, msg: Message, timeout_s: float | None):
        sock = self._socks[key][0] if key in self._socks else self._open(key, address)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg.ref] = (key, fut)
        try:
            transport.send(sock, msg)
            reply = await asyncio.wait_for(fut, timeout_s or self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(ErrorCode.TIMEOUT, f"no reply to {msg.TYPE} within "
                                 f"{timeout_s or self.timeout_s}s") from None
        finally:
            self._pending.pop(msg.ref, None)
        return _raise_if_error(reply)

    async def _reader(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            env = await transport.recv(sock, router_side=False)
            try:
                reply = env.decode()
            except ProtocolError:
                continue
            _, queue = self._streams.get(getattr(reply, "ref", -1), (None, None))
            if queue is not None:
                queue.put_nowait(reply)
                continue
            _, fut = self._pending.get(getattr(reply, "ref", -1), (None, None))
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def _watch(self, key: str, monitor: zmq.asyncio.Socket) -> None:
        """Fail the calls in flight on `key` when its peer disconnects (never a hang)."""
        try:
            while True:
                event = await recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_CONNECTED:
                    self._up[key].set()
                if event["event"] != zmq.EVENT_DISCONNECTED:
                    continue
                self._up[key].clear()
                gone = TaskUnavailable(ErrorCode.TASK_UNAVAILABLE, f"task {key} went away")
                for k, fut in list(self._pending.values()):
                    if k == key and not fut.done():
                        fut.set_exception(gone)
                for k, queue in list(self._streams.values()):
                    if k == key:
                        queue.put_nowait(gone)
        finally:
            monitor.close(linger=0)


def series_request(ref: int, values, horizon: int, quantiles: list[float] | None, top_k: int,
                   timeout_s: float) -> InferSeries:
    """An InferSeries of float32 rows ((T,) becomes one row)."""
    rows = np.asarray(values, dtype=np.float32)
    return InferSeries(ref=ref, values=rows[None] if rows.ndim == 1 else rows, horizon=horizon,
                       quantiles=quantiles, top_k=top_k, timeout_ms=int(timeout_s * 1000),
                       proto=PROTOCOL_VERSION)

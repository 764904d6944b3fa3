"""The Python client library: sync `Client` and asyncio `AsyncClient`.

    with Client() as c:                                   # run dir: FMPLEX_RUN_DIR or the default
        reply = c.infer("sentiment", ["what a great day"])
        reply.labels[0][0].label, reply.labels[0][0].score

Tasks are found by name through the daemon's control socket (Resolve), then each call goes to the
task's own endpoint. Failures raise typed errors (ipc.errors): OverloadedError, RequestTimeout
(also raised client-side when no reply comes within the timeout), TaskUnavailable /
DaemonUnavailable (peer dead), UnknownTask, InvalidRequest, Unauthorized.
`infer_many` pipelines several calls on one connection (batched calls).
"""
from __future__ import annotations

import asyncio
import itertools
import time

import zmq
import zmq.asyncio

from ipc import transport
from ipc.addresses import RunDir, default_run_dir
from ipc.errors import ErrorCode, ProtocolError, RequestTimeout, error_for
from ipc.messages import Endpoint, Error, Infer, InferReply, Message, Resolve

DEFAULT_TIMEOUT_S = 30.0


def _raise_if_error(reply: Message) -> Message:
    if isinstance(reply, Error):
        raise error_for(reply.code, reply.message)
    return reply


class Client:
    def __init__(self, run_dir: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.run_dir = RunDir(run_dir or default_run_dir())
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self._control: zmq.Socket | None = None
        self._tasks: dict[str, zmq.Socket] = {}
        self._refs = itertools.count(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for s in [self._control, *self._tasks.values()]:
            if s is not None:
                s.close(linger=0)
        self.ctx.term()

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
        sock = self._task_socket(task)
        msgs = [Infer(ref=self.ref(), texts=list(b), pairs=list(pairs[i]) if pairs else None,
                      top_k=top_k, timeout_ms=int(timeout_s * 1000)) for i, b in enumerate(batches)]
        for m in msgs:
            transport.send(sock, m)
        replies = self._collect(sock, {m.ref for m in msgs}, timeout_s)
        out = []
        for m in msgs:
            if m.ref not in replies:
                raise RequestTimeout(ErrorCode.TIMEOUT, f"no reply from {task} within {timeout_s}s")
            out.append(_raise_if_error(replies[m.ref]))
        return out

    def _task_socket(self, task: str) -> zmq.Socket:
        sock = self._tasks.get(task)
        if sock is None:
            ep = self.endpoint(task)
            sock = self._tasks[task] = transport.dealer(self.ctx, ep.address)
        return sock

    def _rpc(self, sock: zmq.Socket, msg: Message, timeout_s: float) -> Message:
        replies = self._collect(sock, {msg.ref}, timeout_s, send=msg)
        if msg.ref not in replies:
            raise RequestTimeout(ErrorCode.TIMEOUT, f"no reply to {msg.TYPE} within {timeout_s}s")
        return replies[msg.ref]

    @staticmethod
    def _collect(sock: zmq.Socket, refs: set[int], timeout_s: float, send: Message | None = None):
        if send is not None:
            transport.send(sock, send)
        deadline = time.monotonic() + timeout_s
        replies: dict[int, Message] = {}
        while len(replies) < len(refs):
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                break
            reply = transport.recv_sync(sock, router_side=False).decode()
            if getattr(reply, "ref", None) in refs:       # late replies of earlier calls are dropped
                replies[reply.ref] = reply
        return replies


class AsyncClient:
    """asyncio twin of Client; many calls may be in flight on one connection."""

    def __init__(self, run_dir: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.run_dir = RunDir(run_dir or default_run_dir())
        self.timeout_s = timeout_s
        self.ctx = zmq.asyncio.Context()
        self._socks: dict[str, tuple[zmq.asyncio.Socket, asyncio.Task]] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._refs = itertools.count(1)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        for sock, reader in self._socks.values():
            reader.cancel()
            sock.close(linger=0)
        self._socks.clear()
        self.ctx.term()

    async def control(self, msg: Message, timeout_s: float | None = None) -> Message:
        return await self._call("", self.run_dir.control, msg, timeout_s)

    async def infer(self, task: str, texts: list[str], pairs: list[str] | None = None,
                    top_k: int = 0, timeout_s: float | None = None) -> InferReply:
        timeout_s = timeout_s or self.timeout_s
        if task not in self._socks:
            ep = await self.control(Resolve(ref=next(self._refs), name=task))
            self._open(task, ep.address)
        msg = Infer(ref=next(self._refs), texts=list(texts), pairs=list(pairs) if pairs else None,
                    top_k=top_k, timeout_ms=int(timeout_s * 1000))
        return await self._call(task, None, msg, timeout_s)

    def _open(self, key: str, address: str) -> zmq.asyncio.Socket:
        sock = transport.dealer(self.ctx, address)
        self._socks[key] = (sock, asyncio.get_running_loop().create_task(self._reader(sock)))
        return sock

    async def _call(self, key: str, address: str | None, msg: Message, timeout_s: float | None):
        sock = self._socks[key][0] if key in self._socks else self._open(key, address)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg.ref] = fut
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
            fut = self._pending.get(getattr(reply, "ref", -1))
            if fut is not None and not fut.done():
                fut.set_result(reply)

"""The load driver's client for the baseline processes: the fmplex client protocol (Infer ->
InferReply, the same messages and codec as fmplex.client) on one ZeroMQ DEALER per instance.

`await infer(instance index, text, timeout_s)` returns the InferReply (`await call(instance, msg,
timeout_s)` any request's reply), raises the typed error of an Error reply, or
asyncio.TimeoutError. Created inside the running event loop; close() in it."""
from __future__ import annotations

import asyncio

from bench.servebench.plan import REFS


class ZmqClient:
    """Async client for the baseline processes: the fmplex client protocol on one DEALER each."""

    def __init__(self, endpoints: list[str]):
        import zmq.asyncio
        from ipc import transport
        self.ctx = zmq.asyncio.Context()
        self.socks = [transport.dealer(self.ctx, e) for e in endpoints]
        self.pending: dict[int, asyncio.Future] = {}
        loop = asyncio.get_running_loop()
        self.readers = [loop.create_task(self._reader(s)) for s in self.socks]

    async def _reader(self, sock) -> None:
        from ipc import transport
        while True:
            env = await transport.recv(sock, router_side=False)
            reply = env.decode()
            fut = self.pending.pop(getattr(reply, "ref", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def infer(self, task: int, text: str, timeout_s: float):
        from ipc.messages import PROTOCOL_VERSION, Infer
        return await self.call(task, Infer(ref=next(REFS), texts=[text],
                                           timeout_ms=int(timeout_s * 1e3),
                                           proto=PROTOCOL_VERSION), timeout_s)

    async def call(self, task: int, msg, timeout_s: float):
        """Any client request (its `ref` from REFS) to instance `task`; its reply."""
        from ipc import transport
        from ipc.errors import error_for
        from ipc.messages import Error
        ref = msg.ref
        fut = asyncio.get_running_loop().create_future()
        self.pending[ref] = fut
        transport.send(self.socks[task], msg)
        try:
            reply = await asyncio.wait_for(fut, timeout_s)
        finally:
            self.pending.pop(ref, None)
        if isinstance(reply, Error):
            raise error_for(reply.code, reply.message)
        return reply

    async def close(self) -> None:
        for t in self.readers:
            t.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()

"""The daemon's side of the task zygote (tasklets/zygote.py): start it, ask it to fork task
processes, and follow those processes to their exit.

    zygote = TaskZygote(tokenizer_paths, log_path, env)
    proc = await zygote.spawn(name, spec_path, log_path, env, uid, gid)   # -> ForkedProcess
    code = await proc.wait()

A ForkedProcess offers what the supervisor uses of asyncio.subprocess.Process: pid, returncode,
wait(), send_signal(). The zygote reports each child's exit status (its parent); if the zygote
itself dies, its children live on and are followed by pidfd instead (returncode then
LOST_STATUS: the status went with the zygote), and the next spawn starts a new zygote. The zygote
is started lazily (the first spawn) and runs as the daemon's user, so that with root it can
give each child its owner's uid. `close()` ends it (its children are the supervisor's to stop).

The channel speaks the project's wire (ipc/messages.py, one codec message per SEQPACKET datagram,
as on the handle plane): Spawn -> Spawned | Error, then ZygoteReady and ChildExit unprompted. A
malformed message from the zygote is logged and fails the spawn it names (if any), never the loop.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys

from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.handles import HandlePlaneClosed, recv_message, send_message
from ipc.messages import ChildExit, Error, Spawn, Spawned, ZygoteReady

log = logging.getLogger("fmplexd.zygote")
START_TIMEOUT_S = 120.0
SPAWN_TIMEOUT_S = 30.0
LOST_STATUS = 255
MAX_MESSAGE = 1 << 16
FROM_ZYGOTE = frozenset({ZygoteReady, Spawned, Error, ChildExit})


class ForkedProcess:
    """A task process forked by the zygote (a child of the zygote, not of the daemon)."""

    def __init__(self, pid: int, loop: asyncio.AbstractEventLoop):
        self.pid = pid
        self.returncode: int | None = None
        self._done = loop.create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._done.set_result(code)


class TaskZygote:
    def __init__(self, tokenizers: list[str], log_path: str, env: dict[str, str]):
        self.tokenizers, self.log_path, self.env = tokenizers, log_path, env
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._ids = itertools.count(1)
        self._starting = asyncio.Lock()

    async def spawn(self, name: str, spec: str, log_path: str, env: dict[str, str],
                    uid: int | None, gid: int | None, nice: int = 0,
                    cgroups: tuple[str, ...] = ()) -> ForkedProcess:
        """Fork a task process: `nice` lowers its priority, `cgroups` are the cgroup.procs files
        it joins (both before it runs any of its own code)."""
        await self._ensure_started()
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            request = Spawn(ref=rid, name=name, spec=spec, log=log_path, env=env, uid=uid, gid=gid,
                            nice=nice, cgroups=list(cgroups))
            return await asyncio.wait_for(self._send_and_wait(request, fut), SPAWN_TIMEOUT_S)
        except OSError as e:
            raise FmplexError(ErrorCode.INTERNAL, f"the task zygote is unreachable: {e}") from None
        except asyncio.TimeoutError:
            raise FmplexError(ErrorCode.TIMEOUT, "the task zygote did not answer a spawn") from None
        finally:
            self._replies.pop(rid, None)

    async def _send_and_wait(self, request: Spawn, fut: asyncio.Future) -> ForkedProcess:
        """Send when the socket has room (a burst of restarts can fill it), then await the answer."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                send_message(self._sock, request)
                break
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(self._sock.fileno(), lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    if self._sock is not None:
                        loop.remove_writer(self._sock.fileno())
        return await fut

    async def close(self) -> None:
        if self._sock is not None:
            self._lost("closed")
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), 5.0)
            except asyncio.TimeoutError:
                self._proc.kill()
                await self._proc.wait()
            self._proc = None

    # -- internals ---------------------------------------------------------------------------

    async def _ensure_started(self) -> None:
        async with self._starting:
            if self._sock is None:
                await self._start()
            ready = self._ready
        try:
            await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise FmplexError(ErrorCode.TIMEOUT, "the task zygote did not start (see "
                              f"{self.log_path})") from None

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = [sys.executable, "-m", "tasklets.zygote", "--fd", str(theirs.fileno())]
        for path in self.tokenizers:
            args += ["--tokenizer", path]
        with open(self.log_path, "ab") as log_file:
            self._proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env=self.env, pass_fds=(theirs.fileno(),), start_new_session=True)
        theirs.close()
        ours.setblocking(False)
        self._sock, self._ready = ours, loop.create_future()
        loop.add_reader(ours.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            msg, _ = recv_message(self._sock, FROM_ZYGOTE, max_fds=0, bufsize=MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except HandlePlaneClosed:
            self._lost("exited")
            return
        except ProtocolError as e:
            log.warning("malformed message from the task zygote: %s", e)
            self._fail(getattr(e, "ref", 0), FmplexError(
                ErrorCode.INTERNAL, f"the task zygote answered a malformed message: {e.message}"))
            return
        except OSError as e:
            log.warning("task zygote socket: %s", e)
            self._lost("exited")
            return
        if isinstance(msg, ZygoteReady):
            self.pid = msg.pid
            log.info("task zygote ready (pid %d)", self.pid)
            if not self._ready.done():
                self._ready.set_result(True)
        elif isinstance(msg, ChildExit):
            child = self._children.pop(msg.pid, None)
            if child is not None:
                child.exited(msg.code)
        elif isinstance(msg, Spawned):
            # The handle travels with the answer: the child's exit report may come first.
            proc = self._children[msg.pid] = ForkedProcess(msg.pid, asyncio.get_running_loop())
            fut = self._replies.get(msg.ref)
            if fut is not None and not fut.done():
                fut.set_result(proc)
        else:                    # Error: the fork failed
            self._fail(msg.ref, FmplexError(ErrorCode.INTERNAL,
                                            f"the task zygote could not fork: {msg.message}"))

    def _fail(self, ref: int, error: FmplexError) -> None:
        fut = self._replies.get(ref)
        if fut is not None and not fut.done():
            fut.set_exception(error)

    def _lost(self, why: str) -> None:
        """The zygote is gone (or closed): follow its orphans by pidfd; start anew on next spawn."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self._sock = None
        if why != "closed":
            log.warning("task zygote %s; its %d task process(es) live on", why, len(self._children))
        err = FmplexError(ErrorCode.INTERNAL, f"the task zygote {why}")
        for fut in [self._ready, *self._replies.values()]:
            if fut is not None and not fut.done():
                fut.set_exception(err)
        for child in self._children.values():
            _follow_by_pidfd(loop, child)
        self._children.clear()


def _follow_by_pidfd(loop: asyncio.AbstractEventLoop, child: ForkedProcess) -> None:
    try:
        fd = os.pidfd_open(child.pid)
    except ProcessLookupError:
        child.exited(LOST_STATUS)
        return

    def gone() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        child.exited(LOST_STATUS)
    loop.add_reader(fd, gone)

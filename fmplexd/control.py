"""Control-socket API: operators and clients ask the daemon about and for tasks.

Requests and replies (docs/protocol.md has the fields):
    Hello -> Welcome               Info -> InfoReply           ListTasks -> TaskList
    (listings are tenant-private: a caller sees the tasks it may act for, fmplexd.auth)
    Register -> Registered         RemoveTask -> Ok            Deploy -> Ok (once the task serves)
    TaskCommand -> Ok / Error      (relayed to the task's process, its reply relayed back)
    Resolve -> Endpoint            Health -> HealthReply (long-polls with wait_ms)
    (Resolve refuses, "permission denied", a caller that could not connect to the endpoint)
Managing a task (remove, deploy, command) follows the one authorization rule (fmplexd.auth).
The API sees the sessions service, the supervisor's deploy, the relays and a reply callable.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from fmplexd import __version__
from fmplexd.relays import Relays
from fmplexd.sessions import Sessions
from ipc import codec, transport
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.messages import (BackboneInfo, BackboneStats, Command, Deploy, Endpoint, Error, Health, HealthReply,
                          Hello, Info, InfoReply, ListTasks, Message, Ok, Op, Register, RegionInfo,
                          RemoveTask, Resolve, TaskCommand, TaskList, TaskState, Welcome)

log = logging.getLogger("fmplexd.control")


@dataclass(frozen=True, slots=True)
class DaemonFacts:
    """What Info reports of the daemon itself."""
    epoch: int
    started: float
    run_dir: str
    backbones: Callable[[], list[BackboneInfo]]
    regions: Callable[[], list[RegionInfo]]         # the backbones' regions
    load: Callable[[], list[BackboneStats]]         # the backbones' batches and KV use
    metrics: Callable[[], str] = lambda: ""         # the Prometheus URL, once serving


class ControlApi:
    ACCEPTED = frozenset({Hello, Info, ListTasks, Register, RemoveTask, Deploy, TaskCommand,
                          Resolve, Health})

    def __init__(self, sessions: Sessions, relays: Relays, facts: DaemonFacts,
                 welcome: Callable[[Hello], Welcome],
                 deploy: Callable[[str, str, int | None], Awaitable[str]],
                 forget: Callable[[str], None], reply: Callable[[bytes, Message], None],
                 stopping: Callable[[], bool]):
        self.sessions, self.relays, self.facts = sessions, relays, facts
        self.welcome, self.deploy, self.forget = welcome, deploy, forget
        self.reply, self.stopping = reply, stopping
        self._ready_waiters: dict[str, list[asyncio.Future]] = {}
        sessions.subscribe(self)

    async def handle(self, env: transport.Envelope) -> None:
        try:
            msg = env.decode(self.ACCEPTED)
        except ProtocolError as e:
            self.reply(env.identity, Error(codec.peek_ref(env.frames), e.code, e.message))
            return
        uid = env.peer_uid()
        try:
            if isinstance(msg, Deploy):       # slow: answered from its own task when it serves
                asyncio.get_running_loop().create_task(self._deploy(env.identity, msg, uid))
                return
            if isinstance(msg, Health) and msg.wait_ms and msg.name and not self._health(msg).ready:
                asyncio.get_running_loop().create_task(self._await_ready(env.identity, msg))
                return
            answer = self._answer(env.identity, msg, uid)
        except FmplexError as e:
            answer = Error(msg.ref, e.code, e.message)
        except Exception as e:
            log.exception("control handler failed on %s", msg.TYPE)
            answer = Error(msg.ref, ErrorCode.INTERNAL, repr(e)[:500])
        if answer is not None:
            self.reply(env.identity, answer)

    def _answer(self, identity: bytes, msg, uid: int | None) -> Message | None:
        if isinstance(msg, Hello):
            return self.welcome(msg)
        if isinstance(msg, Info):
            return self._info(msg.ref, uid)
        if isinstance(msg, ListTasks):
            return TaskList(ref=msg.ref, tasks=self.sessions.stats(time.monotonic(), viewer=uid))
        if isinstance(msg, Register):
            return self.sessions.register(msg, uid, identity=None)
        if isinstance(msg, RemoveTask):
            entry = self.sessions.managed(msg.name, uid)
            self.forget(msg.name)
            if entry.identity is not None:
                self.sessions.send(entry, Command(epoch=entry.session, ref=0, op=Op.STOP))
            self.sessions.remove(entry, "task removed by an operator")
            return Ok(ref=msg.ref, message=f"removed {msg.name}")
        if isinstance(msg, TaskCommand):
            entry = self.sessions.managed(msg.name, uid)
            if entry.identity is None or entry.state is not TaskState.READY:
                raise FmplexError(ErrorCode.TASK_UNAVAILABLE,
                                  f"task {msg.name} is {entry.state.value}")
            ref = self.relays.start(identity, msg.ref, entry.identity)
            self.sessions.send(entry, Command(epoch=entry.session, ref=ref, op=msg.op,
                                              spec=msg.spec, spec_dir=msg.spec_dir,
                                              canary_percent=msg.canary_percent))
            return None                       # answered when the task answers (Relays.finish)
        if isinstance(msg, Resolve):
            entry = self.sessions.reachable(msg.name, uid)
            if not entry.endpoint:
                raise FmplexError(ErrorCode.TASK_UNAVAILABLE, f"task {msg.name} has no endpoint")
            return Endpoint(ref=msg.ref, name=msg.name, address=entry.endpoint,
                            tcp_endpoint=entry.tcp_endpoint, server_key=entry.server_key)
        if isinstance(msg, Health):
            return self._health(msg)
        raise FmplexError(ErrorCode.UNEXPECTED, msg.TYPE)

    def _info(self, ref: int, uid: int | None) -> InfoReply:
        f = self.facts
        return InfoReply(ref=ref, epoch=f.epoch, version=__version__,
                         uptime_s=time.monotonic() - f.started, run_dir=f.run_dir,
                         backbones=f.backbones(),
                         regions=f.regions() + self.sessions.regions(viewer=uid),
                         load=f.load(), metrics=f.metrics())

    def _health(self, msg: Health) -> HealthReply:
        if not msg.name:
            stopping = self.stopping()
            return HealthReply(ref=msg.ref, live=True, ready=not stopping,
                               detail="stopping" if stopping else f"{len(self.sessions)} tasks")
        entry = self.sessions.find(msg.name)
        if entry is None:
            return HealthReply(ref=msg.ref, live=False, ready=False, detail="unknown task")
        live = self.sessions.live(entry)
        ready = live and entry.state is TaskState.READY and (not msg.not_pid
                                                              or entry.pid != msg.not_pid)
        return HealthReply(ref=msg.ref, live=live, ready=ready, detail=entry.state.value)

    async def _await_ready(self, identity: bytes, msg: Health) -> None:
        """Long-poll: answer a Health request when its task becomes ready or wait_ms passes."""
        deadline = time.monotonic() + msg.wait_ms / 1e3
        while not self._health(msg).ready and (left := deadline - time.monotonic()) > 0:
            fut = asyncio.get_running_loop().create_future()
            self._ready_waiters.setdefault(msg.name, []).append(fut)
            try:
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:
                waiters = self._ready_waiters.get(msg.name, [])
                if fut in waiters:
                    waiters.remove(fut)
        self.reply(identity, self._health(msg))

    async def _deploy(self, identity: bytes, msg: Deploy, uid: int | None) -> None:
        try:
            name = await self.deploy(msg.spec, msg.spec_path, uid)
            answer = Ok(ref=msg.ref, message=f"task {name} is serving")
        except FmplexError as e:
            answer = Error(msg.ref, e.code, e.message)
        except Exception as e:
            log.exception("deploy failed")
            answer = Error(msg.ref, ErrorCode.INTERNAL, repr(e)[:500])
        self.reply(identity, answer)

    # -- sessions listener ----------------------------------------------------------------------

    def task_ready(self, name: str) -> None:
        """A task committed and serves: wake the long-polls waiting for it."""
        for fut in self._ready_waiters.pop(name, []):
            if not fut.done():
                fut.set_result(True)

    def task_died(self, name: str, reason: str, pid: int) -> None:
        pass

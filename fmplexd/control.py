"""Control-socket API: operators and clients ask the daemon about and for tasks.

Requests and replies (docs/protocol.md has the fields):
    Hello -> Welcome               Info -> InfoReply           ListTasks -> TaskList
    Register -> Registered         RemoveTask -> Ok            Deploy -> Ok (once the task serves)
    TaskCommand -> Ok / Error      (relayed to the task's process, its reply relayed back)
    Resolve -> Endpoint            Health -> HealthReply
Managing a task (remove, deploy, command) needs the task owner's uid, root, or the daemon's uid
(for deploy: the owner named in the spec).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from fmplexd import __version__, lifecycle
from ipc import codec, transport
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.messages import (Command, Deploy, Endpoint, Error, Health, HealthReply, Hello, Info,
                          InfoReply, ListTasks, Ok, Op, Register, Registered, RegionInfo, RemoveTask,
                          Resolve, TaskCommand, TaskList, TaskState)

if TYPE_CHECKING:
    from fmplexd.daemon import Daemon

log = logging.getLogger("fmplexd.control")
ACCEPTED = frozenset({Hello, Info, ListTasks, Register, RemoveTask, Deploy, TaskCommand, Resolve,
                      Health})
RELAY_TIMEOUT_S = 60.0


async def handle(d: "Daemon", env: transport.Envelope) -> None:
    try:
        msg = env.decode(ACCEPTED)
    except ProtocolError as e:
        reply(d, env.identity, Error(codec.peek_ref(env.frames), e.code, e.message))
        return
    uid = env.peer_uid()
    try:
        if isinstance(msg, Deploy):       # slow: answered from its own task when the task serves
            asyncio.get_running_loop().create_task(_deploy(d, env.identity, msg, uid))
            return
        if isinstance(msg, Health) and msg.wait_ms and msg.name and not health(d, msg).ready:
            asyncio.get_running_loop().create_task(_await_ready(d, env.identity, msg))
            return
        answer = _answer(d, env, msg, uid)
    except FmplexError as e:
        answer = Error(msg.ref, e.code, e.message)
    except Exception as e:
        log.exception("control handler failed on %s", msg.TYPE)
        answer = Error(msg.ref, ErrorCode.INTERNAL, repr(e)[:500])
    if answer is not None:
        reply(d, env.identity, answer)


def _answer(d: "Daemon", env, msg, uid: int | None):
    from fmplexd.task_plane import welcome
    if isinstance(msg, Hello):
        return welcome(d, msg)
    if isinstance(msg, Info):
        return info(d, msg.ref)
    if isinstance(msg, ListTasks):
        return TaskList(ref=msg.ref, tasks=task_stats(d))
    if isinstance(msg, Register):
        entry = lifecycle.register(d, msg, uid, identity=None)
        return Registered(ref=msg.ref, epoch=entry.session, slot=entry.slot.grant(),
                          backbone=d.engines[entry.config.backbone].backbone.info,
                          heartbeat_ms=d.config.heartbeat_ms)
    if isinstance(msg, RemoveTask):
        entry = _entry(d, msg.name)
        _authorize_manage(d, uid, entry.config.owner_uid)
        d.supervisor.forget(msg.name)
        if entry.identity is not None:
            d.send_task(entry, Command(epoch=entry.session, ref=d.new_ref(), op=Op.STOP))
        lifecycle.remove(d, entry, "task removed by an operator")
        return Ok(ref=msg.ref, message=f"removed {msg.name}")
    if isinstance(msg, TaskCommand):
        entry = _entry(d, msg.name)
        _authorize_manage(d, uid, entry.config.owner_uid)
        if entry.identity is None or entry.state is not TaskState.READY:
            raise FmplexError(ErrorCode.TASK_UNAVAILABLE, f"task {msg.name} is {entry.state.value}")
        ref = d.new_ref()
        d.relays[ref] = (env.identity, msg.ref, time.monotonic(), entry.identity)
        d.send_task(entry, Command(epoch=entry.session, ref=ref, op=msg.op, spec=msg.spec,
                                   spec_dir=msg.spec_dir, canary_percent=msg.canary_percent))
        return None                       # answered by finish_relay
    if isinstance(msg, Resolve):
        entry = _entry(d, msg.name)
        if not entry.endpoint:
            raise FmplexError(ErrorCode.TASK_UNAVAILABLE, f"task {msg.name} has no endpoint")
        return Endpoint(ref=msg.ref, name=msg.name, address=entry.endpoint,
                        tcp_endpoint=entry.tcp_endpoint, server_key=entry.server_key)
    if isinstance(msg, Health):
        return health(d, msg)
    raise FmplexError(ErrorCode.UNEXPECTED, msg.TYPE)


def info(d: "Daemon", ref: int) -> InfoReply:
    regions = [RegionInfo(name=f"backbone:{b.name}", kind="backbone", bytes=b.manifest.size)
               for b in d.backbones.values()]
    regions += [RegionInfo(name=f"slot:{e.name}", kind="slot", bytes=e.slot.size)
                for e in d.registry.by_name.values() if e.slot.fd >= 0]
    return InfoReply(ref=ref, epoch=d.epoch, version=__version__, uptime_s=time.monotonic() - d.started,
                     run_dir=d.run_dir.path, backbones=[b.info for b in d.backbones.values()],
                     regions=regions)


def task_stats(d: "Daemon") -> list:
    now, out = time.monotonic(), []
    for entry in d.registry.by_name.values():
        sched = d.engines[entry.config.backbone].scheduler
        s = sched.task_stats(entry.session) if entry.session in sched else {
            "queued": 0, "served_tokens": 0, "overloaded": 0}
        out.append(entry.stats(s["queued"], s["served_tokens"], s["overloaded"], now))
    return out


def health(d: "Daemon", msg: Health) -> HealthReply:
    if not msg.name:
        return HealthReply(ref=msg.ref, live=True, ready=not d.stopping,
                           detail="stopping" if d.stopping else f"{len(d.registry.by_name)} tasks")
    entry = d.registry.by_name.get(msg.name)
    if entry is None:
        return HealthReply(ref=msg.ref, live=False, ready=False, detail="unknown task")
    live = entry.state in (TaskState.READY, TaskState.WAITING) and (
        entry.identity is not None or entry.handle_conn is not None)
    ready = live and entry.state is TaskState.READY and (not msg.not_pid or entry.pid != msg.not_pid)
    return HealthReply(ref=msg.ref, live=live, ready=ready, detail=entry.state.value)


async def _await_ready(d: "Daemon", identity: bytes, msg: Health) -> None:
    """Long-poll: answer a Health request when its task becomes ready or wait_ms passes."""
    deadline = time.monotonic() + msg.wait_ms / 1e3
    while not health(d, msg).ready and (left := deadline - time.monotonic()) > 0:
        fut = asyncio.get_running_loop().create_future()
        d.ready_waiters.setdefault(msg.name, []).append(fut)
        try:
            await asyncio.wait_for(fut, left)
        except asyncio.TimeoutError:
            waiters = d.ready_waiters.get(msg.name, [])
            if fut in waiters:
                waiters.remove(fut)
    reply(d, identity, health(d, msg))


async def _deploy(d: "Daemon", identity: bytes, msg: Deploy, uid: int | None) -> None:
    try:
        name = await d.supervisor.deploy(msg.spec, msg.spec_path, uid)
        answer = Ok(ref=msg.ref, message=f"task {name} is serving")
    except FmplexError as e:
        answer = Error(msg.ref, e.code, e.message)
    except Exception as e:
        log.exception("deploy failed")
        answer = Error(msg.ref, ErrorCode.INTERNAL, repr(e)[:500])
    reply(d, identity, answer)


def finish_relay(d: "Daemon", msg: Ok | Error, sender: bytes) -> None:
    """A task answered a relayed Command: pass the answer to the operator who asked. Only the
    process the command went to may answer it."""
    relay = d.relays.get(msg.ref)
    if relay is None or relay[3] != sender:
        return
    del d.relays[msg.ref]
    identity, ref, _, _ = relay
    if isinstance(msg, Ok):
        reply(d, identity, Ok(ref=ref, message=msg.message))
    else:
        reply(d, identity, Error(ref, msg.code, msg.message))


def expire_relays(d: "Daemon", now: float) -> None:
    for ref, (identity, op_ref, t, _) in list(d.relays.items()):
        if now - t > RELAY_TIMEOUT_S:
            del d.relays[ref]
            reply(d, identity, Error(op_ref, ErrorCode.TIMEOUT, "the task did not answer"))


def reply(d: "Daemon", identity: bytes, msg) -> None:
    try:
        transport.send(d.control_sock, msg, identity)
    except (transport.PeerGone, transport.PeerBusy):
        pass


def _entry(d: "Daemon", name: str):
    entry = d.registry.by_name.get(name)
    if entry is None:
        raise FmplexError(ErrorCode.UNKNOWN_TASK, f"no task named {name!r}")
    return entry


def _authorize_manage(d: "Daemon", uid: int | None, owner_uid: int | None) -> None:
    if uid is None or not (uid == owner_uid or uid == os.getuid()
                           or (uid == 0 and d.config.trust_root)):
        raise FmplexError(ErrorCode.UNAUTHORIZED, f"uid {uid} may not manage this task")

"""Task sessions and extension versions in the daemon: register, prepare/commit an update, end a
session (unregister, death, shutdown).

Rules:
- Register creates a session (a fresh epoch) and stages a slot sized for the spec. A name held by
  a live process is a CONFLICT; a name whose process is dead is taken over (same owner only).
- PrepareUpdate stages either the current slot's free half (same layout) or a new slot; Commit
  activates the staged half. The Committed reply waits until no batch reads the half that will be
  written next, so batches in flight always keep the version they started with.
- Ending a session drops the task's queued work (answered with a typed error while the peer can
  still hear it) and frees its slot unless keep_slot_on_death says otherwise.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from fmplexd.registry import TaskEntry
from fmplexd.slots import Slot, drained
from ipc import transport
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.messages import (PROTOCOL_VERSION, Commit, Committed, Error, PrepareUpdate, Register,
                          TaskState, UpdateReady)

if TYPE_CHECKING:
    from fmplexd.daemon import Daemon

log = logging.getLogger("fmplexd.lifecycle")


def may_act_for(d: "Daemon", uid: int | None, owner_uid: int) -> bool:
    return uid is not None and (uid == owner_uid or (uid == 0 and d.config.trust_root))


def register(d: "Daemon", msg: Register, uid: int | None, identity: bytes | None) -> TaskEntry:
    if msg.proto != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"protocol {msg.proto} is not supported "
                            f"(this daemon speaks {PROTOCOL_VERSION})")
    cfg = msg.task
    if not may_act_for(d, uid, cfg.owner_uid):
        raise FmplexError(ErrorCode.UNAUTHORIZED,
                          f"uid {uid} may not register a task owned by uid {cfg.owner_uid}")
    engine = d.engines.get(cfg.backbone)
    if engine is None:
        raise FmplexError(ErrorCode.INVALID_INPUT, f"no backbone named {cfg.backbone!r} "
                          f"(have {sorted(d.engines)})")
    entry = d.registry.by_name.get(cfg.name)
    if entry is not None:
        if entry.config.owner_uid != cfg.owner_uid:
            raise FmplexError(ErrorCode.CONFLICT, f"task {cfg.name} belongs to another owner")
        if _alive(entry) and entry.state in (TaskState.READY, TaskState.WAITING):
            raise FmplexError(ErrorCode.CONFLICT, f"task {cfg.name} is served by pid {entry.pid}")
    _ensure_tenant_dir(d, cfg.owner_uid)
    info = engine.backbone.info
    version = entry.slot.version if entry is not None else 0
    slot = Slot(cfg.name, msg.extension, info, generation=1, version=version)   # validates spec
    session = transport.new_epoch()
    if entry is None:
        entry = TaskEntry(config=cfg, spec=msg.extension, slot=slot, session=session)
        d.registry.add(entry)
    else:
        end_session(d, entry, ErrorCode.TASK_UNAVAILABLE, "task re-registered", TaskState.WAITING)
        _retire_staged(d, entry)
        _retire(d, entry.slot)
        entry.restarts += 1
        entry.config, entry.spec, entry.slot = cfg, msg.extension, slot
        d.registry.new_session(entry, session)
        d.registry.add_slot(entry, slot)
    log.info("task %s registered by pid %d (session %x)", cfg.name, msg.pid, session)
    entry.state = TaskState.WAITING
    entry.staged = (slot, msg.extension)
    entry.identity, entry.pid, entry.endpoint = identity, msg.pid, msg.endpoint
    entry.tcp_endpoint, entry.server_key = msg.tcp_endpoint, msg.server_key
    engine.scheduler.add_task(session, cfg.weight, cfg.queue_limit)
    if identity is not None:
        d.liveness.seen(session)
    return entry


def prepare_update(d: "Daemon", entry: TaskEntry, msg: PrepareUpdate) -> UpdateReady:
    if entry.pending_acks:
        raise FmplexError(ErrorCode.INVALID_INPUT, "the previous commit is not acknowledged yet; "
                          "wait for Committed before preparing the next update")
    info = d.engines[entry.config.backbone].backbone.info
    if entry.slot.fits(msg.extension, info):
        slot = entry.slot
    else:
        slot = Slot(entry.name, msg.extension, info, entry.slot.generation + 1, entry.slot.version)
        d.registry.add_slot(entry, slot)
    if entry.staged is not None and entry.staged[0] is not slot and entry.staged[0] is not entry.slot:
        _retire(d, entry.staged[0])            # an earlier staged slot that was never committed
    entry.staged = (slot, msg.extension)
    return UpdateReady(epoch=entry.session, ref=msg.ref, slot=slot.grant())


def commit(d: "Daemon", entry: TaskEntry, msg: Commit) -> None:
    """Activate the staged half; the Committed reply is sent once the replaced half is drained."""
    if entry.staged is None or entry.staged[0].generation != msg.generation:
        raise FmplexError(ErrorCode.INVALID_INPUT, f"no staged update of slot generation "
                          f"{msg.generation} (prepare an update first)")
    slot, spec = entry.staged
    try:
        old_view = slot.commit(msg.half, spec)
    except ValueError as e:
        raise FmplexError(ErrorCode.INVALID_INPUT, str(e)) from None
    entry.staged = None
    if slot is not entry.slot:                 # a new layout: the old slot retires
        old_view = entry.slot.active
        _retire(d, entry.slot)
        entry.slot = slot
    entry.spec = spec
    entry.state = TaskState.READY
    d.task_ready(entry.name)
    reply = Committed(epoch=entry.session, ref=msg.ref, version=slot.version)
    entry.pending_acks.append((old_view, reply))
    ack_drained(d, entry)


def ack_drained_commits(d: "Daemon") -> None:
    """After a batch: send the Committed replies whose replaced half no batch reads any more."""
    for entry in list(d.registry.by_name.values()):
        if entry.pending_acks:
            ack_drained(d, entry)


def ack_drained(d: "Daemon", entry: TaskEntry) -> None:
    keep = []
    for view, reply in entry.pending_acks:
        if drained(view):
            d.send_task(entry, reply)
        else:
            keep.append((view, reply))
    entry.pending_acks = keep


def end_session(d: "Daemon", entry: TaskEntry, code: ErrorCode, reason: str,
                state: TaskState) -> None:
    """Drop the session's queued work (telling the task when it can still hear), detach it."""
    log.info("task %s (pid %d): session ends (%s) -> %s", entry.name, entry.pid, reason,
             state.value)
    engine = d.engines[entry.config.backbone]
    if entry.session in engine.scheduler:
        stats = engine.scheduler.task_stats(entry.session)
        entry.served_before += stats["served_tokens"]
        entry.overloaded_before += stats["overloaded"]
        dropped = engine.scheduler.remove_task(entry.session)
        if state is not TaskState.DEAD:
            for req in dropped:
                d.send_task(entry, Error(req.payload.msg.ref, code, reason, epoch=entry.session))
    d.liveness.forget(entry.session)
    d.registry.detach(entry)
    entry.pending_acks = []
    entry.state = state
    entry.pid = 0


def task_died(d: "Daemon", entry: TaskEntry, reason: str) -> None:
    if entry.state in (TaskState.DEAD, TaskState.STOPPED):
        return
    pid = entry.pid
    end_session(d, entry, ErrorCode.TASK_UNAVAILABLE, reason, TaskState.DEAD)
    if not d.config.keep_slot_on_death:
        _retire_staged(d, entry)
        _retire(d, entry.slot)
    if d.supervisor is not None:
        d.supervisor.died(entry.name, reason, pid)


def remove(d: "Daemon", entry: TaskEntry, reason: str) -> None:
    end_session(d, entry, ErrorCode.UNKNOWN_TASK, reason, TaskState.STOPPED)
    _retire_staged(d, entry)
    _retire(d, entry.slot)
    d.registry.remove(entry)


def _retire(d: "Daemon", slot: Slot) -> None:
    d.registry.drop_slot(slot)
    slot.close()


def _retire_staged(d: "Daemon", entry: TaskEntry) -> None:
    """Forget an uncommitted update: a new-layout slot staged by PrepareUpdate is freed (its fd and
    mapping), else it would outlive the session (found by tests/test_socket_fuzz.py)."""
    if entry.staged is not None and entry.staged[0] is not entry.slot:
        _retire(d, entry.staged[0])
    entry.staged = None


def _ensure_tenant_dir(d: "Daemon", uid: int) -> None:
    """{run_dir}/tenants/{uid}: where the tenant's task endpoints live; 0700, owned by the tenant,
    so no other tenant can reach them."""
    path = d.run_dir.tenant_dir(uid)
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.getuid() == 0:
            os.chown(path, uid, -1)


def _alive(entry: TaskEntry) -> bool:
    if entry.identity is None and entry.handle_conn is None:
        return False
    if entry.pid:
        try:
            os.kill(entry.pid, 0)
        except (ProcessLookupError, OverflowError):   # OverflowError: a pid (up to 2^31 on the
            return False                               # wire) that no process can have
        except PermissionError:
            return True
    return True

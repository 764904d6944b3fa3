"""The sessions service: every task the daemon knows, its session, liveness, slot and versions.

It is the one owner of task state (the Registry of TaskEntry records, heartbeat liveness, slots);
the socket handlers call its methods and never reach into the records themselves.

Rules:
- Register creates a session (a fresh epoch) and stages a slot sized for the spec. A name held by
  a live process is a CONFLICT; a name whose process is dead is taken over (same owner only). The
  task's pipeline family must be its backbone's family.
- PrepareUpdate stages either the current slot's free half (same layout) or a new slot; Commit
  activates the staged half. The Committed reply waits until no batch reads the half that will be
  written next, so batches in flight always keep the version they started with.
- Ending a session drops the task's queued work (answered with a typed error while the peer can
  still hear it) and frees its slot unless keep_slot_on_death says otherwise.
- Every message to a task goes through `send`: a peer that is gone means the task died.
Listeners (the supervisor, readiness long-polls) learn `task_ready(name)` and
`task_died(name, reason, pid)`; observers (metrics) learn each request's end: `request_done(entry,
latency_s)` or `request_failed(entry, code)`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Callable, Protocol

from fmplexd.auth import Authority
from fmplexd.engine import Engine
from fmplexd.families.base import Delivery, Pending
from fmplexd.registry import Registry, TaskEntry
from fmplexd.slots import Slot, drained
from ipc import transport
from ipc.addresses import RunDir
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.handles import Credentials
from ipc.messages import (PROTOCOL_VERSION, CacheStats, Commit, Committed, Error, Heartbeat, Message,
                          PrepareUpdate, Register, Registered, RegionInfo, TaskState, TaskStats,
                          UpdateReady)

log = logging.getLogger("fmplexd.sessions")
ALL_TASKS = -1           # a `viewer` that sees every task (the daemon's own loops, metrics)


class Listener(Protocol):
    def task_ready(self, name: str) -> None: ...
    def task_died(self, name: str, reason: str, pid: int) -> None: ...


class Observer(Protocol):
    def request_done(self, task: TaskEntry, latency_s: float) -> None: ...
    def request_failed(self, task: TaskEntry, code: ErrorCode) -> None: ...


class Sessions:
    def __init__(self, engine: Engine, authority: Authority, run_dir: RunDir, heartbeat_ms: int,
                 liveness_ms: int, keep_slot_on_death: bool = False):
        self.engine, self.authority, self.run_dir = engine, authority, run_dir
        self.heartbeat_ms, self.keep_slot_on_death = heartbeat_ms, keep_slot_on_death
        self.registry = Registry()
        self.liveness = transport.Liveness(liveness_ms / 1e3)
        self._send: Callable[[bytes, Message], None] | None = None
        self._listeners: list[Listener] = []
        self._observers: list[Observer] = []
        self._beat = 0

    def attach(self, send: Callable[[bytes, Message], None]) -> None:
        """How messages reach task processes: send(identity, msg), raising transport.PeerGone or
        PeerBusy (the task plane's ROUTER)."""
        self._send = send

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def observe(self, observer: Observer) -> None:
        self._observers.append(observer)

    # -- lookups --------------------------------------------------------------------------------

    def get(self, name: str) -> TaskEntry:
        entry = self.registry.by_name.get(name)
        if entry is None:
            raise FmplexError(ErrorCode.UNKNOWN_TASK, f"no task named {name!r}")
        return entry

    def find(self, name: str) -> TaskEntry | None:
        return self.registry.by_name.get(name)

    def entries(self) -> list[TaskEntry]:
        return list(self.registry.by_name.values())

    def __len__(self) -> int:
        return len(self.registry.by_name)

    def managed(self, name: str, uid: int | None) -> TaskEntry:
        """The task, if `uid` may manage it (remove it, relay commands to it)."""
        entry = self.get(name)
        self.authority.check(uid, entry.config.owner_uid, f"manage task {name}")
        return entry

    def reachable(self, name: str, uid: int | None) -> TaskEntry:
        """The task, if `uid` can reach its endpoint: over ipc:// (the owner and root), or over
        tcp:// with CURVE when the task has one (its keys decide there). Otherwise UNAUTHORIZED,
        saying so, rather than an endpoint the caller would wait on in vain."""
        entry = self.get(name)
        if not self.authority.reaches(uid, entry.config.owner_uid) and not entry.tcp_endpoint:
            raise FmplexError(ErrorCode.UNAUTHORIZED,
                              f"permission denied: task {name} belongs to another owner")
        return entry

    def acting(self, epoch: int, uid: int | None, identity: bytes, now: float) -> TaskEntry:
        """The session's task for a task-plane message of `identity` (uid from ZAP): it must be
        a current session and the peer must act for its owner. The peer is then seen alive."""
        entry = self.registry.by_session.get(epoch)
        if entry is None:
            raise ProtocolError(ErrorCode.STALE_EPOCH, f"epoch {epoch} is no current session")
        self.authority.check(uid, entry.config.owner_uid, f"act for task {entry.name}")
        entry.identity = identity
        self.liveness.seen(entry.session, now)
        return entry

    def stats(self, now: float, viewer: int | None = ALL_TASKS) -> list[TaskStats]:
        """Every task's stats; with a `viewer` uid (None: unknown), only the tasks it may act for
        (tenant-private listings)."""
        out = []
        for entry in self._visible(viewer):
            s = self.engine.task_stats(entry.session)
            out.append(entry.stats(s["queued"], s["served_tokens"], s["overloaded"], now,
                                   s["device_s"]))
        return out

    def regions(self, viewer: int | None = ALL_TASKS) -> list[RegionInfo]:
        """Slot regions (of the tasks `viewer` may act for, as in `stats`)."""
        return [RegionInfo(name=f"slot:{e.name}", kind="slot", bytes=e.slot.size)
                for e in self._visible(viewer) if e.slot.fd >= 0]

    def _visible(self, viewer: int | None) -> list[TaskEntry]:
        entries = list(self.registry.by_name.values())
        if viewer == ALL_TASKS:
            return entries
        return [e for e in entries if self.authority.allows(viewer, e.config.owner_uid)]

    def live(self, entry: TaskEntry) -> bool:
        return entry.state in (TaskState.READY, TaskState.WAITING) and (
            entry.identity is not None or entry.handle_conn is not None)

    # -- sessions -------------------------------------------------------------------------------

    def register(self, msg: Register, uid: int | None, identity: bytes | None) -> Registered:
        if msg.proto != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"protocol {msg.proto} is not supported "
                                f"(this daemon speaks {PROTOCOL_VERSION})")
        cfg = msg.task
        self.authority.check(uid, cfg.owner_uid, f"register a task owned by uid {cfg.owner_uid}")
        info = self.engine.info(cfg.backbone)
        if cfg.family is not info.family:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"task {cfg.name} needs a {cfg.family.value} "
                              f"backbone; {info.name} is a {info.family.value} backbone")
        entry = self.registry.by_name.get(cfg.name)
        if entry is not None:
            if entry.config.owner_uid != cfg.owner_uid:
                raise FmplexError(ErrorCode.CONFLICT, f"task {cfg.name} belongs to another owner")
            if _alive(entry) and entry.state in (TaskState.READY, TaskState.WAITING):
                raise FmplexError(ErrorCode.CONFLICT, f"task {cfg.name} is served by pid {entry.pid}")
        self._ensure_tenant_dir(cfg.owner_uid)
        version = entry.slot.version if entry is not None else 0
        slot = Slot(cfg.name, msg.extension, info, generation=1, version=version)  # validates spec
        session = transport.new_epoch()
        if entry is None:
            entry = TaskEntry(config=cfg, spec=msg.extension, slot=slot, session=session)
            self.registry.add(entry)
        else:
            self._end(entry, ErrorCode.TASK_UNAVAILABLE, "task re-registered", TaskState.WAITING)
            self._retire_staged(entry)
            self._retire(entry.slot)
            entry.restarts += 1
            entry.config, entry.spec, entry.slot = cfg, msg.extension, slot
            self.registry.new_session(entry, session)
            self.registry.add_slot(entry, slot)
        log.info("task %s registered by pid %d (session %x)", cfg.name, msg.pid, session)
        entry.state = TaskState.WAITING
        entry.received = 0
        entry.staged = (slot, msg.extension)
        entry.identity, entry.pid, entry.endpoint = identity, msg.pid, msg.endpoint
        entry.tcp_endpoint, entry.server_key = msg.tcp_endpoint, msg.server_key
        self.engine.add_task(session, cfg.backbone, cfg.weight, cfg.queue_limit)
        if identity is not None:
            self.liveness.seen(session)
        return Registered(ref=msg.ref, epoch=session, slot=slot.grant(), backbone=info,
                          heartbeat_ms=self.heartbeat_ms)

    def submit(self, entry: TaskEntry, msg: Message, now: float) -> bool:
        """Queue a request of a serving task in the engine (True), or answer it with a typed Error
        carrying the admission figures (False): NOT_REGISTERED before its first commit, a refusal
        of the engine (invalid, oversized, overloaded); a refusal other than OVERLOADED counts as
        the task's error."""
        entry.received += 1
        try:
            if entry.state is not TaskState.READY or entry.slot.active is None:
                raise FmplexError(ErrorCode.NOT_REGISTERED,
                                  f"task {entry.name} has not committed an extension yet")
            self.engine.admit(entry, msg, now)
            return True
        except FmplexError as e:
            if e.code is not ErrorCode.OVERLOADED:
                entry.errors += 1
            for o in self._observers:
                o.request_failed(entry, e.code)
            self.send(entry, self._admission(entry, Error(msg.ref, e.code, e.message,
                                                          epoch=entry.session)))
            return False

    def cache_report(self, entry: TaskEntry, msg: CacheStats) -> None:
        """The task's result cache (its own memory): counted in its stats, never trusted further."""
        entry.cache = (msg.hits, msg.misses, msg.bytes)

    def cancel(self, entry: TaskEntry, ref: int, now: float) -> None:
        """Stop the task's streaming request `ref`; its final message goes out now or when the
        iteration computing it ends (nothing, if it already finished)."""
        self.deliver(self.engine.cancel(entry, ref), now)

    def prepare_update(self, entry: TaskEntry, msg: PrepareUpdate) -> UpdateReady:
        if entry.pending_acks:
            raise FmplexError(ErrorCode.INVALID_INPUT, "the previous commit is not acknowledged "
                              "yet; wait for Committed before preparing the next update")
        info = self.engine.info(entry.config.backbone)
        if entry.slot.fits(msg.extension, info):
            slot = entry.slot
        else:
            slot = Slot(entry.name, msg.extension, info, entry.slot.generation + 1,
                        entry.slot.version)
            self.registry.add_slot(entry, slot)
        if entry.staged is not None and entry.staged[0] is not slot \
                and entry.staged[0] is not entry.slot:
            self._retire(entry.staged[0])        # an earlier staged slot that was never committed
        entry.staged = (slot, msg.extension)
        return UpdateReady(epoch=entry.session, ref=msg.ref, slot=slot.grant())

    def commit(self, entry: TaskEntry, msg: Commit) -> None:
        """Activate the staged half; the Committed reply is sent once the replaced half drained."""
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
            self._retire(entry.slot)
            entry.slot = slot
        entry.spec = spec
        entry.state = TaskState.READY
        for listener in self._listeners:
            listener.task_ready(entry.name)
        entry.pending_acks.append((old_view, Committed(epoch=entry.session, ref=msg.ref,
                                                       version=slot.version)))
        self._ack_drained(entry)

    def ack_drained(self) -> None:
        """After a batch: send the Committed replies whose replaced half no batch reads any more."""
        for entry in list(self.registry.by_name.values()):
            if entry.pending_acks:
                self._ack_drained(entry)

    def unregister(self, entry: TaskEntry) -> None:
        self.remove(entry, "task unregistered")

    def remove(self, entry: TaskEntry, reason: str) -> None:
        """Forget the task: its queued work is answered UNKNOWN_TASK, its slot freed."""
        self._end(entry, ErrorCode.UNKNOWN_TASK, reason, TaskState.STOPPED)
        self._retire_staged(entry)
        self._retire(entry.slot)
        self.registry.remove(entry)

    def task_died(self, entry: TaskEntry, reason: str) -> None:
        if entry.state in (TaskState.DEAD, TaskState.STOPPED):
            return
        pid = entry.pid
        self._end(entry, ErrorCode.TASK_UNAVAILABLE, reason, TaskState.DEAD)
        if not self.keep_slot_on_death:
            self._retire_staged(entry)
            self._retire(entry.slot)
        for listener in self._listeners:
            listener.task_died(entry.name, reason, pid)

    def end_all(self, code: ErrorCode, reason: str) -> None:
        """Shutdown: every session ends, its queued work answered with `code`."""
        for entry in list(self.registry.by_name.values()):
            self._end(entry, code, reason, TaskState.STOPPED)

    # -- handle plane ---------------------------------------------------------------------------

    def open_regions(self, token: bytes, creds: Credentials, conn_id: int) -> tuple[TaskEntry, Slot]:
        """The task and slot a handle-plane token grants, if the peer may act for its owner; the
        connection is tied to the task from then on (its close means the process died)."""
        found = self.registry.by_token.get(token)
        if found is None:
            raise FmplexError(ErrorCode.UNAUTHORIZED, "unknown or expired slot token")
        entry, slot = found
        self.authority.check(creds.uid, entry.config.owner_uid, f"map the slot of task {entry.name}")
        self.registry.attach_conn(entry, conn_id)
        return entry, slot

    def connection_closed(self, conn_id: int, creds: Credentials) -> None:
        for entry in self.registry.closed_conn(conn_id):
            self.task_died(entry, f"process {creds.pid} closed its handle-plane connection")

    # -- messages to tasks ----------------------------------------------------------------------

    def send(self, entry: TaskEntry, msg: Message) -> bool:
        """Send to a task's process; a gone peer means the task died."""
        if entry.identity is None or self._send is None:
            return False
        try:
            self._send(entry.identity, msg)
            return True
        except transport.PeerGone:
            self.task_died(entry, "task-plane peer gone")
        except transport.PeerBusy:
            log.warning("task %s is not reading its results; dropping a message", entry.name)
        return False

    def deliver(self, deliveries: list[Delivery], now: float) -> None:
        """Send the engine's messages to tasks that still hold the session, and count them."""
        for d in deliveries:
            entry = d.task
            if entry.session != d.session:         # the task died or re-registered meanwhile
                continue
            msg = d.msg
            if isinstance(msg, Error):
                if msg.code is ErrorCode.TIMEOUT:
                    entry.timeouts += 1
                elif msg.code is not ErrorCode.OVERLOADED:
                    entry.errors += 1
                for o in self._observers:
                    o.request_failed(entry, msg.code)
            elif d.final:
                entry.requests += 1
                if d.latency_s is not None:
                    entry.latency.add(d.latency_s, now)
                    for o in self._observers:
                        o.request_done(entry, d.latency_s)
            self.send(entry, self._admission(entry, msg))

    def _admission(self, entry: TaskEntry, msg: Message) -> Message:
        """The message with the session's admission figures (room, seen): Result, Tokens, Error."""
        return replace(msg, room=self.engine.room(entry.session), seen=entry.received)

    # -- liveness -------------------------------------------------------------------------------

    def expire_silent(self, now: float) -> None:
        """Tasks unheard of for the liveness window are dead."""
        for session in self.liveness.expired(now):
            entry = self.registry.by_session.get(session)
            if entry is not None:
                self.task_died(entry, "heartbeat timeout")

    def heartbeat(self) -> None:
        self._beat += 1
        for entry in list(self.registry.by_name.values()):
            if entry.identity is not None:
                self.send(entry, Heartbeat(epoch=entry.session, seq=self._beat))

    # -- internals ------------------------------------------------------------------------------

    def _end(self, entry: TaskEntry, code: ErrorCode, reason: str, state: TaskState) -> None:
        """Drop the session's queued work (telling the task when it can still hear), detach it."""
        log.info("task %s (pid %d): session ends (%s) -> %s", entry.name, entry.pid, reason,
                 state.value)
        stats = self.engine.task_stats(entry.session)
        entry.served_before += stats["served_tokens"]
        entry.overloaded_before += stats["overloaded"]
        entry.device_before_s += stats["device_s"]
        entry.cache_before = (entry.cache_before[0] + entry.cache[0],
                              entry.cache_before[1] + entry.cache[1])
        entry.cache = (0, 0, 0)
        dropped: list[Pending] = self.engine.remove_task(entry.session)
        if state is not TaskState.DEAD:
            for p in dropped:
                self.send(entry, Error(p.msg.ref, code, reason, epoch=entry.session))
        self.liveness.forget(entry.session)
        self.registry.detach(entry)
        entry.pending_acks = []
        entry.state = state
        entry.pid = 0

    def _ack_drained(self, entry: TaskEntry) -> None:
        keep = []
        for view, reply in entry.pending_acks:
            if drained(view):
                self.send(entry, reply)
            else:
                keep.append((view, reply))
        entry.pending_acks = keep

    def _retire(self, slot: Slot) -> None:
        self.registry.drop_slot(slot)
        slot.close()

    def _retire_staged(self, entry: TaskEntry) -> None:
        """Forget an uncommitted update: a new-layout slot staged by PrepareUpdate is freed (its
        fd and mapping), else it would outlive the session (found by tests/test_socket_fuzz.py)."""
        if entry.staged is not None and entry.staged[0] is not entry.slot:
            self._retire(entry.staged[0])
        entry.staged = None

    def _ensure_tenant_dir(self, uid: int) -> None:
        """{run_dir}/tenants/{uid}: where the tenant's task endpoints live; 0700, owned by the
        tenant, so no other tenant can reach them."""
        path = self.run_dir.tenant_dir(uid)
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

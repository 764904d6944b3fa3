"""The daemon's record of tasks: one `TaskEntry` per registered task name, plus lookups by session
epoch, handle-plane connection and slot token."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from fmplexd.slots import Slot
from ipc.messages import ExtensionSpec, TaskConfig, TaskState, TaskStats


STAT_MAX = (1 << 63) - 1     # TaskStats' counters are Int(0): a reply holding more cannot decode


def _count(n: int) -> int:
    """A counter the task reported (its result cache: CacheStats carries up to 2**64 - 1), summed
    over sessions, capped to what TaskStats carries, so one task's report cannot make the task
    listing that every client reads undecodable."""
    return min(n, STAT_MAX)


class LatencyWindow:
    """Latencies of the last `size` requests and completion times of the last `window_s` seconds."""

    def __init__(self, size: int = 2048, window_s: float = 10.0):
        self._lat = collections.deque(maxlen=size)
        self._done = collections.deque()
        self.window_s = window_s

    def add(self, latency_s: float, now: float) -> None:
        self._lat.append(latency_s)
        self._done.append(now)
        self._prune(now)         # here too: without list_tasks calls it would grow per request

    def _prune(self, now: float) -> None:
        while self._done and now - self._done[0] > self.window_s:
            self._done.popleft()

    def percentiles(self) -> tuple[float, float]:
        if not self._lat:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.fromiter(self._lat, float), [50, 99])
        return float(p50) * 1e3, float(p99) * 1e3

    def rate(self, now: float) -> float:
        self._prune(now)
        return len(self._done) / self.window_s


@dataclass(slots=True, eq=False)
class TaskEntry:
    config: TaskConfig
    spec: ExtensionSpec
    slot: Slot
    session: int                       # current session epoch
    state: TaskState = TaskState.WAITING
    identity: bytes | None = None      # task-plane DEALER identity of the attached process
    pid: int = 0
    endpoint: str = ""
    tcp_endpoint: str = ""
    server_key: str = ""
    handle_conn: int | None = None
    received: int = 0                  # requests of the current session received (admission's seen)
    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    restarts: int = 0
    served_before: int = 0             # served tokens / overloads / device time of earlier
    overloaded_before: int = 0         # sessions
    device_before_s: float = 0.0
    cache: tuple[int, int, int] = (0, 0, 0)          # this session's result cache: hits, misses,
    cache_before: tuple[int, int] = (0, 0)           # bytes (CacheStats); hits, misses of earlier
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    staged: tuple | None = None        # (slot, spec) granted for writing, not yet committed
    pending_acks: list = field(default_factory=list)   # (view being retired, Committed reply)

    @property
    def name(self) -> str:
        return self.config.name

    def stats(self, queued: int, served_tokens: int, overloaded: int, now: float,
              device_s: float = 0.0) -> TaskStats:
        p50, p99 = self.latency.percentiles()
        return TaskStats(
            name=self.name, state=self.state, owner_uid=self.config.owner_uid,
            weight=self.config.weight, pid=self.pid, version=self.slot.version, queued=queued,
            requests=self.requests, served_tokens=self.served_before + served_tokens,
            errors=self.errors, timeouts=self.timeouts,
            overloaded=self.overloaded_before + overloaded, p50_ms=p50, p99_ms=p99,
            rate=self.latency.rate(now), restarts=self.restarts, endpoint=self.endpoint,
            backbone=self.config.backbone, device_ms=(self.device_before_s + device_s) * 1e3,
            family=self.config.family, cache_hits=_count(self.cache_before[0] + self.cache[0]),
            cache_misses=_count(self.cache_before[1] + self.cache[1]),
            cache_bytes=_count(self.cache[2]))


class Registry:
    def __init__(self):
        self.by_name: dict[str, TaskEntry] = {}
        self.by_session: dict[int, TaskEntry] = {}
        self.by_token: dict[bytes, tuple[TaskEntry, Slot]] = {}
        self.by_conn: dict[int, set[TaskEntry]] = {}     # one process may hold several sessions

    def add(self, entry: TaskEntry) -> None:
        self.by_name[entry.name] = entry
        self.by_session[entry.session] = entry
        self.add_slot(entry, entry.slot)

    def add_slot(self, entry: TaskEntry, slot: Slot) -> None:
        self.by_token[slot.token] = (entry, slot)

    def drop_slot(self, slot: Slot) -> None:
        self.by_token.pop(slot.token, None)

    def new_session(self, entry: TaskEntry, session: int) -> None:
        self.by_session.pop(entry.session, None)
        entry.session = session
        self.by_session[session] = entry

    def detach(self, entry: TaskEntry) -> None:
        """The entry's session ends: its epoch, connection and identity stop resolving."""
        self.by_session.pop(entry.session, None)
        self._unlink_conn(entry)
        entry.identity = None

    def remove(self, entry: TaskEntry) -> None:
        self.detach(entry)
        self.by_name.pop(entry.name, None)

    def attach_conn(self, entry: TaskEntry, conn_id: int) -> None:
        self._unlink_conn(entry)
        entry.handle_conn = conn_id
        self.by_conn.setdefault(conn_id, set()).add(entry)

    def closed_conn(self, conn_id: int) -> list[TaskEntry]:
        """Entries whose process held this handle-plane connection (it just closed)."""
        entries = self.by_conn.pop(conn_id, set())
        for e in entries:
            e.handle_conn = None
        return list(entries)

    def _unlink_conn(self, entry: TaskEntry) -> None:
        if entry.handle_conn is not None:
            holders = self.by_conn.get(entry.handle_conn)
            if holders is not None:
                holders.discard(entry)
                if not holders:
                    del self.by_conn[entry.handle_conn]
        entry.handle_conn = None

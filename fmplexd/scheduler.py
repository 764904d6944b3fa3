"""Batch-aware weighted fair queueing over tasks: a pure policy object (no sockets, threads or clock;
the caller passes `now`).

Model. Each task i has a weight w_i, a bounded FIFO queue and a virtual time v_i = (tokens served to
i) / w_i plus lifts. Serving a request of cost c (its tokens) advances v_i by c / w_i. A task that
becomes backlogged starts at max(v_i, V), where V is the minimum virtual time of the backlogged tasks
(or, when none is backlogged, the virtual time of the last task served), so an idle task banks no
credit. This is start-time fair queueing (SFQ, Goyal et al. 1996) with token costs.

Batch formation fills a token budget by repeatedly taking the backlogged task with the least
virtual time (inter-task batching) and, while it is still the least served, its consecutive
requests (intra-task batching). If the least-served task's next request does not fit, the batch
closes (it is first in the next one); a batch is never empty while anything is queued, even if
one request exceeds the budget alone (work-conserving).

Fairness bound. For any two tasks i, j that are backlogged throughout an interval of batch
formations, the normalised service they receive in it differs by at most one maximum request each:
    | S_i / w_i - S_j / w_j |  <=  C_i / w_i + C_j / w_j
where S is tokens served in the interval and C the largest request cost of that task. (Each charge
goes to a task with minimal virtual time, and a task overshoots the next smallest by less than one
of its requests.) Over a saturated run the served-token shares therefore converge to the weights.

Deadlines: a request whose deadline has passed is removed by `expire` (also run at the start of
`form_batch`) and returned to the caller, which answers it with a timeout; it is never executed.
Overload: `submit` to a full queue raises Overloaded at once.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable

from ipc.errors import ErrorCode, FmplexError

QUEUED, TAKEN, EXPIRED, DROPPED = range(4)


class Overloaded(FmplexError):
    def __init__(self, task, limit: int):
        super().__init__(ErrorCode.OVERLOADED, f"task {task} has {limit} requests queued (its limit)")


@dataclass(slots=True, eq=False)
class Request:
    task: Hashable
    cost: int                  # tokens
    deadline: float            # absolute, in the caller's clock
    payload: Any = None        # opaque to the scheduler
    arrival: float = 0.0
    state: int = QUEUED


@dataclass(slots=True, eq=False)
class _Task:
    key: Hashable
    weight: float
    limit: int
    vtime: float = 0.0
    queue: deque = field(default_factory=deque)
    queued: int = 0            # live requests in queue (expired ones may still sit in it, lazily)
    in_heap: bool = False
    served_tokens: int = 0
    served_requests: int = 0
    expired: int = 0
    overloaded: int = 0


@dataclass(slots=True)
class Batch:
    requests: list[Request]
    expired: list[Request]
    tokens: int


class Scheduler:
    def __init__(self, token_budget: int = 4096, max_requests: int = 256):
        self.token_budget, self.max_requests = token_budget, max_requests
        self._tasks: dict[Hashable, _Task] = {}
        self._heap: list[tuple[float, int, _Task]] = []     # backlogged tasks by virtual time
        self._deadlines: list[tuple[float, int, Request]] = []
        self._seq = itertools.count()
        self._vclock = 0.0                                  # virtual time of the last task served
        self.queued = 0

    # -- tasks ---------------------------------------------------------------------------------

    def add_task(self, key: Hashable, weight: float, queue_limit: int) -> None:
        if key in self._tasks:
            raise ValueError(f"task {key} already present")
        if weight <= 0 or queue_limit < 1:
            raise ValueError("weight must be > 0 and queue_limit >= 1")
        self._tasks[key] = _Task(key, weight, queue_limit, vtime=self._vclock)

    def set_weight(self, key: Hashable, weight: float, queue_limit: int | None = None) -> None:
        if weight <= 0:
            raise ValueError("weight must be > 0")
        task = self._tasks[key]
        task.weight = weight
        if queue_limit is not None:
            task.limit = queue_limit

    def remove_task(self, key: Hashable) -> list[Request]:
        """Forget a task; returns its queued requests (state DROPPED) for the caller to answer."""
        task = self._tasks.pop(key)
        dropped = [r for r in task.queue if r.state == QUEUED]
        for r in dropped:
            r.state = DROPPED
        self.queued -= len(dropped)
        task.queue.clear()
        task.queued = 0
        return dropped

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tasks

    def task_stats(self, key: Hashable) -> dict:
        t = self._tasks[key]
        return {"queued": t.queued, "served_tokens": t.served_tokens,
                "served_requests": t.served_requests, "expired": t.expired,
                "overloaded": t.overloaded, "vtime": t.vtime, "weight": t.weight}

    # -- requests ------------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        """Queue a request, or raise Overloaded (queue full) / KeyError (unknown task)."""
        task = self._tasks[req.task]
        if task.queued >= task.limit:
            task.overloaded += 1
            raise Overloaded(req.task, task.limit)
        task.queue.append(req)
        task.queued += 1
        self.queued += 1
        heapq.heappush(self._deadlines, (req.deadline, next(self._seq), req))
        if not task.in_heap:
            self._drop_idle_top()
            lift = self._heap[0][0] if self._heap else self._vclock
            task.vtime = max(task.vtime, lift)
            self._push(task)

    def expire(self, now: float) -> list[Request]:
        """Remove and return every queued request whose deadline is <= now."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, req = heapq.heappop(self._deadlines)
            if req.state != QUEUED:
                continue
            req.state = EXPIRED
            task = self._tasks.get(req.task)
            if task is not None:
                task.queued -= 1
                task.expired += 1
            self.queued -= 1
            out.append(req)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline among queued requests (for the caller's timer), or None."""
        while self._deadlines and self._deadlines[0][2].state != QUEUED:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def form_batch(self, now: float) -> Batch:
        """Expire, then fill one batch as described in the module docstring."""
        expired = self.expire(now)
        taken: list[Request] = []
        budget, cap, heap = self.token_budget, self.max_requests, self._heap
        while len(taken) < cap and heap:
            task = heap[0][2]
            if not task.queued:                    # idle: only expired/dropped requests were left
                heapq.heappop(heap)
                task.in_heap = False
                continue
            head = self._head(task)
            if head.cost > budget and taken:
                break
            self._vclock = max(self._vclock, task.vtime)
            n = len(heap)                          # the runner-up is a child of the root
            next_v = float("inf") if n == 1 else heap[1][0] if n == 2 else min(heap[1][0], heap[2][0])
            queue, vtime, weight, count, tokens = task.queue, task.vtime, task.weight, 0, 0
            while True:                            # this task's consecutive requests
                queue.popleft()
                head.state = TAKEN
                taken.append(head)
                budget -= head.cost
                tokens += head.cost
                count += 1
                vtime += head.cost / weight
                if vtime > next_v or len(taken) >= cap or count == task.queued:
                    break
                head = self._head(task)
                if head.cost > budget:
                    break
            task.vtime = vtime
            task.queued -= count
            self.queued -= count
            task.served_tokens += tokens
            task.served_requests += count
            if task.queued:                        # one sift instead of pop + push
                heapq.heapreplace(heap, (vtime, next(self._seq), task))
            else:
                heapq.heappop(heap)
                task.in_heap = False
        return Batch(taken, expired, self.token_budget - budget)

    # -- internals -----------------------------------------------------------------------------

    def _drop_idle_top(self) -> None:
        """Pop heap entries of tasks left with nothing queued (expired, dropped or removed)."""
        while self._heap and self._head(self._heap[0][2]) is None:
            heapq.heappop(self._heap)[2].in_heap = False

    def _push(self, task: _Task) -> None:
        heapq.heappush(self._heap, (task.vtime, next(self._seq), task))
        task.in_heap = True

    @staticmethod
    def _head(task: _Task) -> Request | None:
        q = task.queue
        while q and q[0].state != QUEUED:
            q.popleft()
        return q[0] if q else None

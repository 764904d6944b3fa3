"""Batch-aware weighted fair queueing over tasks: a pure policy object (no sockets, threads or clock;
the caller passes `now`).

Model. Each task i has a weight w_i, a bounded FIFO queue and a virtual time v_i = (tokens served to
i) / w_i plus lifts. Serving a request of cost c (its tokens) advances v_i by c / w_i. A task that
becomes backlogged starts at max(v_i, max(V, F) - K / w_i), where V is the minimum virtual time of
the backlogged tasks (or, when none is backlogged, F: the largest virtual time a task had when it
was served) and K = `idle_credit` tokens: it banks at most K tokens of credit however long it was
idle, as Linux CFS places a waking task a bounded amount behind min_vruntime (and like FQ-CoDel's
priority for sparse flows). This bounded idle credit is the default (K = DEFAULT_IDLE_CREDIT, 512
tokens: measured in bench/fairness_policy.py and bench/fairness.py); K = 0 is the strict rule,
max(v_i, V), plain start-time fair queueing (SFQ, Goyal et al. 1996) with token costs. F is
monotonic and V >= F without credit, so credits measured from max(V, F) never chain. A task running
below its share (a quiet one) then has its next request served ahead of a continuously backlogged
neighbour instead of in turn with it.

Groups and prices. Every task belongs to a group (one per hosted backbone); a batch holds requests
of one group only (one forward), and `form_batch` picks the group whose least-served backlogged
task has the least virtual time, so all tasks of all backbones share the device under one policy:
a task's weight is its share of the device, whatever its backbone. Each group has a price (device
time per cost unit, relative; the caller sets it from measured throughput, 1.0 by default), and
serving a cost c advances v_i by c * price / w_i. Work done outside `form_batch` (a decoder's
generated tokens, at prices the caller states) is charged with `charge`; a preempted request is
put back at the head of its task's queue with `requeue`.

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
The bound holds for any K: tasks backlogged throughout an interval never re-enter it. A task that
became backlogged at the interval's start may lead by K / w_i more (its banked credit).

Deadlines: a request whose deadline has passed is removed by `expire` (also run at the start of
`form_batch`) and returned to the caller, in deadline order (ties in submission order), which answers
it with a timeout; it is never executed. Requests are filed by deadline in buckets of
1/DEADLINE_BUCKETS of the caller's time unit (a heap orders the buckets); a taken request stays in its
bucket until the bucket comes due and is then skipped at the cost of one comparison, where a heap of
requests would pay one pop (log of everything submitted within a deadline) per request served.
Overload: `submit` to a full queue raises Overloaded at once.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable

from ipc.errors import ErrorCode, FmplexError

QUEUED, TAKEN, EXPIRED, DROPPED = range(4)       # QUEUED must stay 0: hot loops test `state`
DEADLINE_BUCKETS = 1024                          # deadline buckets per unit of the caller's clock
COMPACT_SLACK = 4096                             # filed-but-dead requests tolerated before compacting
DEFAULT_IDLE_CREDIT = 512.0                      # K, tokens (see the module docstring)
_INF = float("inf")
_ANY = object()                                  # form_batch: whichever group is due


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
class _Group:
    """The backlogged tasks of one group (backbone) by virtual time: heap of (vtime, order, task)."""
    name: Hashable
    price: float = 1.0
    heap: list = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Task:
    key: Hashable
    weight: float
    limit: int
    group: _Group
    vtime: float = 0.0
    inv_weight: float = 1.0    # price / weight: form_batch multiplies
    order: int = 0             # heap tie-break: when it last became backlogged (set by _push)
    queue: deque = field(default_factory=deque)
    queued: int = 0            # live requests in queue (expired ones may still sit in it, lazily)
    in_heap: bool = False
    served_tokens: int = 0
    submitted: int = 0         # requests queued (and put back) so far; served = the rest of them
    dropped: int = 0           # cancelled while queued
    expired: int = 0
    overloaded: int = 0


@dataclass(slots=True)
class Batch:
    requests: list[Request]
    expired: list[Request]
    tokens: int
    group: Hashable = None      # whose requests these are


class Scheduler:
    def __init__(self, token_budget: int = 4096, max_requests: int = 256,
                 idle_credit: float = DEFAULT_IDLE_CREDIT):
        if idle_credit < 0:
            raise ValueError("idle_credit must be >= 0")
        self.token_budget, self.max_requests = token_budget, max_requests
        self.idle_credit = float(idle_credit)              # K: tokens a returning task may bank
        self._tasks: dict[Hashable, _Task] = {}
        self._groups: dict[Hashable, _Group] = {}
        self._buckets: dict[float, list[Request]] = {}     # deadline bucket -> its requests
        self._bucket_keys: list[float] = []                 # heap of the keys of _buckets
        self._filed = 0                                     # entries in _buckets, live or not
        self._seq = itertools.count()
        self._vclock = 0.0                                  # virtual time of the last task served
        self.queued = 0

    # -- tasks ---------------------------------------------------------------------------------

    def add_task(self, key: Hashable, weight: float, queue_limit: int, group: Hashable = None
                 ) -> None:
        if key in self._tasks:
            raise ValueError(f"task {key} already present")
        if weight <= 0 or queue_limit < 1:
            raise ValueError("weight must be > 0 and queue_limit >= 1")
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(group)
        self._tasks[key] = _Task(key, weight, queue_limit, g, vtime=self._vclock,
                                 inv_weight=g.price / weight)

    def set_price(self, group: Hashable, price: float) -> None:
        """Device time per cost unit of `group`'s requests (relative to the other groups)."""
        if not price > 0:
            raise ValueError("price must be > 0")
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(group)
        g.price = price
        for t in self._tasks.values():
            if t.group is g:
                t.inv_weight = price / t.weight

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
                "served_requests": t.submitted - t.queued - t.expired - t.dropped,
                "expired": t.expired,
                "overloaded": t.overloaded, "vtime": t.vtime, "weight": t.weight,
                "group": t.group.name}

    def room(self, key: Hashable) -> int:
        """How many more requests `key`'s queue takes before Overloaded (0 for an unknown task)."""
        t = self._tasks.get(key)
        return 0 if t is None else max(0, t.limit - t.queued)

    def vtime(self, key: Hashable) -> float:
        return self._tasks[key].vtime

    def backlogged_groups(self) -> list[Hashable]:
        """Groups with queued requests, the one to serve next (least virtual time) first."""
        tops = []
        for g in self._groups.values():
            self._drop_idle_top(g.heap)
            if g.heap:
                tops.append((g.heap[0][0], g.heap[0][1], g.name))
        return [name for _, _, name in sorted(tops, key=lambda t: (t[0], t[1]))]

    def charge(self, key: Hashable, cost: float) -> None:
        """Account `cost` units of work served to `key` outside form_batch (e.g. generated tokens).
        Its heap position is corrected lazily, when it next comes to the top."""
        task = self._tasks.get(key)
        if task is None or cost <= 0:
            return
        task.vtime += cost * task.inv_weight
        task.served_tokens += int(cost)
        if task.vtime > self._vclock:
            self._vclock = task.vtime

    def cancel(self, req: Request) -> bool:
        """Drop a queued request (state DROPPED; it is skipped lazily). False if it was not
        queued (taken, expired, or dropped already)."""
        task = self._tasks.get(req.task)
        if req.state != QUEUED or task is None:
            return False
        req.state = DROPPED
        task.queued -= 1
        task.dropped += 1
        self.queued -= 1
        return True

    def requeue(self, req: Request) -> None:
        """Put a taken request back at the head of its task's queue (a preempted sequence that
        will be recomputed); its queue limit does not apply, its deadline still does."""
        task = self._tasks.get(req.task)
        if task is None:
            raise KeyError(f"task {req.task} is gone")
        req.state = QUEUED
        task.queue.appendleft(req)
        task.queued += 1
        task.submitted += 1
        self.queued += 1
        self._file(req)
        if not task.in_heap:
            self._push(task)

    # -- requests ------------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        """Queue a request, or raise Overloaded (queue full) / KeyError (unknown task)."""
        task = self._tasks[req.task]
        if task.queued >= task.limit:
            task.overloaded += 1
            raise Overloaded(req.task, task.limit)
        task.queue.append(req)
        task.queued += 1
        task.submitted += 1
        self.queued += 1
        self._file(req)
        if not task.in_heap:
            lift = self._min_backlogged_vtime()
            if self.idle_credit:             # from the served frontier: credits do not chain
                lift = max(lift, self._vclock) - self.idle_credit * task.inv_weight
            task.vtime = max(task.vtime, lift)
            self._push(task)

    def _file(self, req: Request) -> None:
        """File a queued request in its deadline bucket."""
        key = req.deadline * DEADLINE_BUCKETS
        if -_INF < key < _INF:
            key = math.floor(key)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [req]
            heapq.heappush(self._bucket_keys, key)
        else:
            bucket.append(req)
        self._filed += 1
        if self._filed > 2 * self.queued + COMPACT_SLACK:
            self._compact()

    def _min_backlogged_vtime(self) -> float:
        """V: the least virtual time of a backlogged task (any group), else the served frontier."""
        v = _INF
        for g in self._groups.values():
            self._drop_idle_top(g.heap)
            if g.heap and g.heap[0][0] < v:
                v = g.heap[0][0]
        return self._vclock if v == _INF else v

    def _compact(self) -> None:
        """Drop taken/dropped requests from the deadline buckets. Taken requests are otherwise
        only skipped when their bucket comes due, so with long deadlines they would pile up;
        compacting whenever they outnumber the queued ones keeps the memory O(queued), at an
        amortised O(1) per request."""
        live = {k: [r for r in b if r.state == QUEUED] for k, b in self._buckets.items()}
        self._buckets = {k: b for k, b in live.items() if b}
        self._bucket_keys = list(self._buckets)
        heapq.heapify(self._bucket_keys)
        self._filed = sum(len(b) for b in self._buckets.values())

    def expire(self, now: float) -> list[Request]:
        """Remove and return every queued request whose deadline is <= now (earliest first)."""
        out: list[Request] = []
        keys, buckets = self._bucket_keys, self._buckets
        while keys and keys[0] / DEADLINE_BUCKETS <= now:     # the bucket may hold deadlines <= now
            key = keys[0]
            due, keep = [], []
            for req in buckets[key]:
                if req.state == QUEUED:
                    (due if req.deadline <= now else keep).append(req)
            self._filed -= len(buckets[key]) - len(keep)
            if keep:                       # the bucket `now` falls in: later buckets are all later
                buckets[key] = keep
            else:
                heapq.heappop(keys)
                del buckets[key]
            due.sort(key=_deadline)        # stable: ties stay in submission order
            for req in due:
                req.state = EXPIRED
                task = self._tasks.get(req.task)
                if task is not None:
                    task.queued -= 1
                    task.expired += 1
            self.queued -= len(due)
            out += due
            if keep:
                break
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline among queued requests (for the caller's timer), or None."""
        keys, buckets = self._bucket_keys, self._buckets
        while keys:
            live = [r for r in buckets[keys[0]] if r.state == QUEUED]
            self._filed -= len(buckets[keys[0]]) - len(live)
            if live:
                buckets[keys[0]] = live
                return min(r.deadline for r in live)
            del buckets[heapq.heappop(keys)]
        return None

    def form_batch(self, now: float, horizon: float = 0.0, group: Hashable = _ANY,
                   budget: int | None = None, max_requests: int | None = None) -> Batch:
        """Expire, then fill one batch of one group as described in the module docstring (the
        group to serve next unless `group` names one; `budget` and `max_requests` default to the
        scheduler's). `horizon` is how long the batch will take: a request whose deadline falls
        before now + horizon could only finish late, so it is expired (answered with a timeout)
        rather than run."""
        expired = self.expire(now + horizon)
        if group is _ANY:
            order = self.backlogged_groups()
            group = order[0] if order else None
        g = self._groups.get(group)
        taken: list[Request] = []
        take = taken.append
        budget = full = self.token_budget if budget is None else budget
        cap = self.max_requests if max_requests is None else max_requests
        heap = g.heap if g is not None else []
        vclock, n_taken, n = self._vclock, 0, len(heap)
        replace, pop = heapq.heapreplace, heapq.heappop
        while n_taken < cap and n:
            vtime, _, task = heap[0]
            if task.vtime != vtime:                # charged since it was filed: re-sort it
                replace(heap, (task.vtime, task.order, task))
                continue
            queued = task.queued
            if not queued:                         # idle: only expired/dropped requests were left
                pop(heap)
                n -= 1
                task.in_heap = False
                continue
            queue = task.queue
            head = queue.popleft()
            while head.state:                      # not QUEUED: expired or dropped, left lazily
                head = queue.popleft()
            cost = head.cost
            if cost > budget and n_taken:          # the batch is full: it is first in the next
                queue.appendleft(head)
                break
            if vtime > vclock:
                vclock = vtime
            if n > 2:                              # the runner-up is a child of the root
                next_v, other = heap[1][0], heap[2][0]
                if other < next_v:
                    next_v = other
            else:
                next_v = heap[1][0] if n == 2 else _INF
            inv = task.inv_weight
            head.state = TAKEN                     # the first request always fits
            take(head)
            budget -= cost
            tokens = cost
            vtime += cost * inv
            count = 1
            if vtime <= next_v and queued > 1:     # still the least served: its next requests
                room = min(queued, cap - n_taken)
                while vtime <= next_v and count < room:
                    head = queue.popleft()
                    while head.state:
                        head = queue.popleft()
                    cost = head.cost
                    if cost > budget:
                        queue.appendleft(head)
                        break
                    head.state = TAKEN
                    take(head)
                    budget -= cost
                    tokens += cost
                    count += 1
                    vtime += cost * inv
            n_taken += count
            task.vtime = vtime
            task.served_tokens += tokens
            task.queued = queued = queued - count
            if queued:                             # one sift instead of pop + push
                replace(heap, (vtime, task.order, task))
            else:
                pop(heap)
                n -= 1
                task.in_heap = False
        self._vclock = vclock
        self.queued -= n_taken
        return Batch(taken, expired, full - budget, group)

    # -- internals -----------------------------------------------------------------------------

    def _drop_idle_top(self, heap: list) -> None:
        """Pop heap entries of tasks left with nothing queued (expired, dropped or removed)."""
        while heap and self._head(heap[0][2]) is None:
            heapq.heappop(heap)[2].in_heap = False

    def _push(self, task: _Task) -> None:
        task.order = next(self._seq)
        heapq.heappush(task.group.heap, (task.vtime, task.order, task))
        task.in_heap = True

    @staticmethod
    def _head(task: _Task) -> Request | None:
        q = task.queue
        while q and q[0].state != QUEUED:
            q.popleft()
        return q[0] if q else None


def _deadline(req: Request) -> float:
    return req.deadline

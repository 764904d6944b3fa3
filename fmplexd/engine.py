"""The engine: the only door to scheduling and execution, for every backbone the daemon hosts.

Callers add and remove tasks, admit requests, and drive the loop with three calls:
    work = engine.next_work(now)      expire what is late, form the next batch or iteration (the
                                      backbone whose least-served task is due, of any family)
    outputs = engine.run(work)        in a worker thread: one forward of that backbone's executor
    deliveries = engine.finish(work, outputs, t0, t1)      messages for the tasks
Several works may be out at once (the daemon's executor lanes): every call but `run` comes from
one thread; a runner that is not `concurrent` (a decoder: each iteration continues the last) has
at most one work out, and its backbone is passed over until that one finished.
The engine owns no sockets and no clock: it returns Deliveries, and the daemon sends them.
One Scheduler holds the tasks of all backbones (one group per backbone, priced by measured
throughput), so a task's weight is its share of the device whatever its family.
"""
from __future__ import annotations

import logging
from typing import Hashable

from fmplexd.families import runner_for
from fmplexd.families.base import Backbone, Delivery, Pending, Runner, TaskRef, Work
from fmplexd.scheduler import Request, Scheduler
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import BackboneInfo, BackboneStats, Error, Message

log = logging.getLogger("fmplexd.engine")
REPRICE = 0.1               # re-price a backbone when its throughput moved by more than this


class Engine:
    def __init__(self, backbones: dict[str, Backbone], settings):
        """`settings`: the daemon's config (token_budget, max_batch_requests, batch_target_ms,
        max_request_tokens, idle_credit_tokens)."""
        self.backbones = backbones
        self.scheduler = Scheduler(settings.token_budget, settings.max_batch_requests,
                                   settings.idle_credit_tokens)
        self.runners: dict[str, Runner] = {name: runner_for(bb, settings)
                                           for name, bb in backbones.items()}
        self._prices: dict[str, float] = {}
        self._batches: dict[str, int] = {}
        self._out: dict[str, int] = {}             # backbone -> works formed, not yet finished
        self._device_s: dict[int, float] = {}      # session -> forward time of its work

    # -- backbones ------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """A throw-away forward per backbone; calibrates batch budgets and prices."""
        for name, runner in self.runners.items():
            runner.warm_up()
            log.info("backbone %s (%s): %.0f tokens/s at start, batch budget %d tokens", name,
                     runner.backbone.family.value, runner.pacer.tokens_per_s, runner.pacer.budget)
        self._reprice(force=True)

    def infos(self) -> list[BackboneInfo]:
        return [bb.info for bb in self.backbones.values()]

    def load(self) -> list[BackboneStats]:
        """Each backbone's batches so far, throughput and (decoders) KV pool use."""
        return [BackboneStats(name=g, batches=self._batches.get(g, 0),
                              tokens_per_s=r.pacer.tokens_per_s, **r.kv_stats())
                for g, r in self.runners.items()]

    def info(self, backbone: str) -> BackboneInfo:
        bb = self.backbones.get(backbone)
        if bb is None:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"no backbone named {backbone!r} "
                              f"(have {sorted(self.backbones)})")
        return bb.info

    # -- tasks ----------------------------------------------------------------------------------

    def add_task(self, session: int, backbone: str, weight: float, queue_limit: int) -> None:
        self.info(backbone)
        self.scheduler.add_task(session, weight, queue_limit, group=backbone)

    def remove_task(self, session: int) -> list:
        """Forget a session's task; returns its queued and running requests (each with .msg.ref,
        to be answered by the caller)."""
        self._device_s.pop(session, None)
        if session not in self.scheduler:
            return []
        group = self.scheduler.task_stats(session)["group"]
        dropped = [r.payload for r in self.scheduler.remove_task(session) if r.payload is not None]
        return dropped + self.runners[group].forget(session)

    def cancel(self, task: TaskRef, ref: int) -> list[Delivery]:
        """Stop a streaming request of `task` (a generation) and free what it holds."""
        return self.runners[task.config.backbone].cancel(self.scheduler, task.session, ref)

    def task_stats(self, session: int) -> dict:
        """The scheduler's figures of a session's task and `device_s`: the forward time its
        requests took (each batch's time split among its requests by their costs)."""
        if session not in self.scheduler:
            return {"queued": 0, "served_tokens": 0, "overloaded": 0, "device_s": 0.0}
        return {**self.scheduler.task_stats(session), "device_s": self._device_s.get(session, 0.0)}

    def room(self, session: int) -> int:
        """Requests the session's queue still takes (its admission room)."""
        return self.scheduler.room(session)

    @property
    def queued(self) -> int:
        return self.scheduler.queued

    def admit(self, task: TaskRef, msg: Message, now: float) -> None:
        """Validate a request with its backbone's runner and queue it; raises FmplexError
        (invalid input, oversized, overloaded, not a request of that backbone's family)."""
        runner = self.runners[task.config.backbone]
        if type(msg) not in runner.accepts:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"{msg.TYPE} is not a request of backbone "
                              f"{runner.backbone.name} ({runner.backbone.family.value})")
        deadline_ms = getattr(msg, "deadline_ms", 0) or task.config.deadline_ms
        self.scheduler.submit(runner.admit(task, msg, now, now + deadline_ms / 1e3))

    # -- the loop -------------------------------------------------------------------------------

    def expire(self, now: float) -> list[Delivery]:
        """Timeouts for queued requests whose deadline passed."""
        return _timeouts(self.scheduler.expire(now))

    def next_work(self, now: float) -> tuple[Work | None, list[Delivery]]:
        """The next unit of work (None if there is nothing to run) and the timeouts found."""
        late: list[Delivery] = []
        for group in self._due(now):
            runner = self.runners[group]
            if self._out.get(group) and not runner.concurrent:
                continue
            work = runner.form(self.scheduler, group, now)
            late += _timeouts(work.expired) if work is not None else []
            if work is not None and work.items:
                self._out[group] = self._out.get(group, 0) + 1
                return work, late
            if work is not None:
                work.runner.release(work)
        return None, late

    def run(self, work: Work) -> list:
        """In a worker thread: the forward."""
        return work.runner.run(work)

    def finish(self, work: Work, outputs, t0: float, t1: float) -> list[Delivery]:
        """Unpin the work's extension versions and turn its outputs (or the FmplexError that
        failed it) into deliveries."""
        work.runner.release(work)
        deliveries = work.runner.finish(work, outputs, t0, t1)
        group = work.batch.group
        self._out[group] -= 1
        self._batches[group] = self._batches.get(group, 0) + 1
        self._account(work, t1 - t0)
        self._reprice()
        return deliveries

    def _account(self, work: Work, seconds: float) -> None:
        """Split a batch's forward time among its tasks by the rows each had in it."""
        total = sum(rows for _, rows in work.rows)
        for session, rows in work.rows:
            if total and session in self.scheduler:         # (a task removed meanwhile: none)
                self._device_s[session] = self._device_s.get(session, 0.0) + seconds * rows / total

    def _due(self, now: float) -> list[Hashable]:
        """Backbones with work, the one whose least-served task is due first."""
        order = self.scheduler.backlogged_groups()
        return order + [g for g, r in self.runners.items() if g not in order and r.busy()]

    def _reprice(self, force: bool = False) -> None:
        """Price each backbone's cost units by its measured device time per token, relative to
        the first backbone, so virtual time counts device time across backbones."""
        rates = {g: r.pacer.tokens_per_s for g, r in self.runners.items()}
        ref = next(iter(rates.values()), 0.0)
        if not ref:
            return
        for g, rate in rates.items():
            price = ref / rate if rate else 1.0
            old = self._prices.get(g)
            if force or old is None or abs(price - old) > REPRICE * old:
                self._prices[g] = price
                self.scheduler.set_price(g, price)


def _timeouts(expired: list[Request]) -> list[Delivery]:
    out = []
    for req in expired:
        p: Pending = req.payload
        if p is not None:
            out.append(Delivery(p.task, p.session, Error(p.msg.ref, ErrorCode.TIMEOUT,
                                                         "deadline passed before execution",
                                                         epoch=p.session)))
    return out

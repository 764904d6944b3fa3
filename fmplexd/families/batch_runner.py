"""The runner of the one-forward families (text encoders, vision, time series): a request becomes
one scheduler request; a formed batch becomes executor work items, each pinning its task's
extension version; the forward's outputs become one Result per request (DESIGN.md, "Request
paths": request -> queue -> batch of many tasks -> packed forward -> Result).

A family subclasses BatchRunner and supplies:
    accepts                           its request message types
    outputs                           the Output kinds it serves
    cost(msg, view) -> int            validate a request (FmplexError if bad); its cost in the
                                      family's unit (tokens, patches, steps: see the family)
    item(msg, view)                   the executor's work item for an admitted request
    execute(items) -> [np.ndarray]    the forward (in the worker thread): one 2-D array per item
    warm_item() -> (item, cost)       a representative item for the warm-up and calibration
"""
from __future__ import annotations

import time
from typing import Hashable

import numpy as np

from fmplexd.families.base import Backbone, Delivery, Pacer, Pending, TaskRef, Work
from fmplexd.scheduler import Request, Scheduler
from fmplexd.slots import ExtensionView
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import Error, ExtensionSpec, HeadInput, Message, Output, Result

HEAD_INPUTS = {Output.LOGITS: HeadInput.POOLED, Output.TOKEN_LOGITS: HeadInput.TOKENS}


def bare_view() -> ExtensionView:
    """An extension view with nothing in it (warm-up and calibration batches)."""
    return ExtensionView(0, ExtensionSpec(), [], [], None, None)


class BatchRunner:
    accepts: frozenset[type] = frozenset()
    outputs: frozenset[Output] = frozenset()
    concurrent = True                  # batches are independent: lanes may run several at once

    def __init__(self, backbone: Backbone, budget: int, max_requests: int,
                 batch_target_s: float = 0.0):
        self.backbone = backbone
        self.pacer = Pacer(budget, batch_target_s)
        self.max_requests = max_requests

    # -- the family's part ------------------------------------------------------------------

    def cost(self, msg: Message, view: ExtensionView) -> int:
        raise NotImplementedError

    def item(self, msg: Message, view: ExtensionView):
        raise NotImplementedError

    def execute(self, items: list) -> list[np.ndarray]:
        raise NotImplementedError

    def warm_item(self) -> tuple[object, int]:
        raise NotImplementedError

    # -- the Runner protocol (fmplexd.families.base) ------------------------------------------

    def warm_up(self) -> None:
        """One throw-away forward (first calls are slow), then one timed to calibrate the pacer."""
        item, cost = self.warm_item()
        self.execute([item])
        t0 = time.perf_counter()
        self.execute([item])
        self.pacer.calibrate(cost, time.perf_counter() - t0)

    def busy(self) -> bool:
        return False                   # all its work waits in the scheduler

    def forget(self, session: int) -> list:
        return []                      # nothing of a session outlives its queue

    def kv_stats(self) -> dict:
        return {}                      # no KV cache: one forward per request

    def cancel(self, scheduler: Scheduler, session: int, ref: int) -> list[Delivery]:
        return []                      # one forward per request: nothing to stop mid-way

    def admit(self, task: TaskRef, msg: Message, now: float, deadline: float) -> Request:
        """Validate a request against the backbone and the task's extension (FmplexError)."""
        view = task.slot.active
        check_output(msg.output, view, self.outputs, self.backbone)
        cost = self.cost(msg, view)
        return Request(task.session, cost, deadline, Pending(task, task.session, msg, now), now)

    def form(self, scheduler: Scheduler, group: Hashable, now: float) -> Work | None:
        """The next batch of this backbone's tasks; each item pins its task's extension version."""
        batch = scheduler.form_batch(now, self.pacer.horizon(), group, self.pacer.budget,
                                     self.max_requests)
        items, pendings = [], []
        for req in batch.requests:
            p: Pending = req.payload
            # A taken request stays in the scheduler's deadline bucket until its deadline (lazy
            # removal): drop the payload, which holds the request and its zero-copy frames (each
            # pins a libzmq receive buffer), or memory grows by rate x deadline.
            req.payload = None
            view = p.task.slot.active
            if p.task.session != p.session or view is None:   # task re-registered meanwhile
                continue
            view.in_flight += 1
            p.view = view
            items.append(self.item(p.msg, view))
            pendings.append(p)
        return Work(self, batch, items, pendings, batch.expired, batch.tokens,
                    [(r.task, r.cost) for r in batch.requests])

    def run(self, work: Work) -> list[np.ndarray]:
        return self.execute(work.items)

    def release(self, work: Work) -> None:
        for p in work.pendings:
            p.view.in_flight -= 1

    def finish(self, work: Work, outputs: list | FmplexError, t0: float, t1: float
               ) -> list[Delivery]:
        """Results for the batch's requests (every one an Error if the forward failed)."""
        if isinstance(outputs, FmplexError):
            return [Delivery(p.task, p.session, Error(p.msg.ref, outputs.code, outputs.message,
                                                      epoch=p.session))
                    for p in work.pendings]
        self.pacer.observe(work.tokens, t1 - t0)
        run_ms = (t1 - t0) * 1e3
        out = []
        for p, data in zip(work.pendings, outputs):
            out.append(Delivery(p.task, p.session, Result(
                epoch=p.session, ref=p.msg.ref, version=p.view.version, output=p.msg.output,
                data=data, queue_ms=max(0.0, (t0 - p.arrival) * 1e3), run_ms=run_ms),
                latency_s=t1 - p.arrival))
        return out


def check_output(output: Output, view: ExtensionView, allowed: frozenset[Output],
                 backbone: Backbone) -> None:
    """The family serves `output`, and a head output has a head on the rows it needs."""
    if output not in allowed:
        raise FmplexError(ErrorCode.INVALID_INPUT, f"output {output.value} is not served by "
                          f"backbone {backbone.name} ({backbone.family.value}; it serves "
                          f"{sorted(o.value for o in allowed)})")
    need = HEAD_INPUTS.get(output)
    if need is not None and view.head_input is not need:
        raise FmplexError(ErrorCode.INVALID_INPUT,
                          f"output {output.value} needs a head on {need.value} rows; the task has "
                          f"{'none' if view.head_input is None else view.head_input.value}")


def oversized(what: str, limit: int, backbone: Backbone) -> FmplexError:
    return FmplexError(ErrorCode.OVERSIZED, f"{what} exceeds the {limit} allowed by backbone "
                       f"{backbone.name}")

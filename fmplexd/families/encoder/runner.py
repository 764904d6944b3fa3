"""The text-encoder family's runner: a Submit becomes one scheduler request; a formed batch becomes
executor work items (each pinning its task's extension version); outputs become Results.

One forward per request (DESIGN.md, "Request paths"): Submit -> queue -> batch of many tasks ->
packed forward -> Result per request.
"""
from __future__ import annotations

import time
from typing import Hashable

import numpy as np

from fmplexd.families.base import Backbone, Delivery, Pacer, Pending, TaskRef, Work
from fmplexd.families.encoder.executor import Executor, WorkItem
from fmplexd.families.encoder.forward import Encoder
from fmplexd.scheduler import Request, Scheduler
from fmplexd.slots import ExtensionView
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import Error, ExtensionSpec, HeadInput, Output, Result, Submit


class EncoderRunner:
    accepts = frozenset({Submit})

    def __init__(self, backbone: Backbone, token_budget: int, max_requests: int,
                 max_request_tokens: int, batch_target_s: float = 0.0):
        self.backbone = backbone
        self.executor = Executor(Encoder(backbone.config, backbone.weights))
        self.pacer = Pacer(token_budget, batch_target_s)
        self.max_requests = max_requests
        self.max_request_tokens = max_request_tokens

    def warm_up(self, tokens: int = 256) -> None:
        """One throw-away forward (first calls are slow) that also calibrates the batch budget."""
        view = ExtensionView(0, ExtensionSpec(), [], [], None, None)
        n = max(1, tokens // 32)
        item = WorkItem(view, Output.POOLED, np.full(32 * n, 1000, np.int32), [32] * n)
        self.executor.run([item])
        t0 = time.perf_counter()
        self.executor.run([item])
        self.pacer.calibrate(32 * n, time.perf_counter() - t0)

    def busy(self) -> bool:
        return False                   # all its work waits in the scheduler

    def kv_stats(self) -> dict:
        return {}                      # no KV: one forward per request

    def forget(self, session: int) -> list:
        return []                      # nothing of a session outlives its queue

    def cancel(self, scheduler: Scheduler, session: int, ref: int) -> list[Delivery]:
        return []                      # one forward per request: nothing to cancel mid-way

    def admit(self, task: TaskRef, msg: Submit, now: float, deadline: float) -> Request:
        """Validate a Submit against the backbone and the task's extension; the scheduler request
        costs its tokens (virtual prompt rows included). Raises FmplexError."""
        view = task.slot.active
        cfg = self.backbone.config
        _check_ids(msg, cfg.vocab, cfg.type_vocab)
        limit = cfg.max_positions - view.prompt_tokens
        longest = max(msg.lengths)
        if longest > limit:
            raise FmplexError(ErrorCode.OVERSIZED, f"a sequence of {longest} tokens exceeds the "
                              f"{limit} positions left by backbone {self.backbone.name}")
        cost = int(len(msg.ids)) + view.prompt_tokens * len(msg.lengths)
        if cost > self.max_request_tokens:
            raise FmplexError(ErrorCode.OVERSIZED, f"request of {cost} tokens exceeds the "
                              f"daemon's limit of {self.max_request_tokens}")
        _check_output(msg.output, view)
        return Request(task.session, cost, deadline, Pending(task, task.session, msg, now), now)

    def form(self, scheduler: Scheduler, group: Hashable, now: float) -> Work | None:
        """The next batch of this backbone's tasks; each item pins its task's extension version."""
        batch = scheduler.form_batch(now, self.pacer.horizon(), group, self.pacer.budget,
                                     self.max_requests)
        items, pendings = [], []
        for req in batch.requests:
            p: Pending = req.payload
            # A taken request stays in the scheduler's deadline bucket until its deadline (lazy
            # removal): drop the payload, which holds the Submit and its zero-copy frames (each
            # pins a libzmq receive buffer of ~8 KB), or memory grows by rate x deadline.
            req.payload = None
            view = p.task.slot.active
            if p.task.session != p.session or view is None:   # task re-registered meanwhile
                continue
            view.in_flight += 1
            p.view = view
            m = p.msg
            items.append(WorkItem(view, m.output, m.ids, m.lengths, m.type_ids))
            pendings.append(p)
        return Work(self, batch, items, pendings, batch.expired, batch.tokens)

    def run(self, work: Work) -> list[np.ndarray]:
        return self.executor.run(work.items)

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


def _check_ids(msg: Submit, vocab: int, type_vocab: int) -> None:
    if sum(msg.lengths) != len(msg.ids):
        raise FmplexError(ErrorCode.INVALID_INPUT,
                          f"lengths sum to {sum(msg.lengths)} but {len(msg.ids)} ids were sent")
    if len(msg.ids) and (int(msg.ids.min()) < 0 or int(msg.ids.max()) >= vocab):
        raise FmplexError(ErrorCode.INVALID_INPUT, f"token ids must lie in [0, {vocab})")
    t = msg.type_ids
    if t is not None:
        if len(t) != len(msg.ids):
            raise FmplexError(ErrorCode.INVALID_INPUT, "type_ids and ids differ in length")
        if len(t) and (int(np.min(t)) < 0 or int(np.max(t)) >= type_vocab):
            raise FmplexError(ErrorCode.INVALID_INPUT, f"type ids must lie in [0, {type_vocab})")


def _check_output(output: Output, view: ExtensionView) -> None:
    need = {Output.LOGITS: HeadInput.POOLED, Output.TOKEN_LOGITS: HeadInput.TOKENS}.get(output)
    if need is not None and view.head_input is not need:
        raise FmplexError(ErrorCode.INVALID_INPUT,
                          f"output {output.value} needs a head on {need.value} rows; the task has "
                          f"{'none' if view.head_input is None else view.head_input.value}")

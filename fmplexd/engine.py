"""One backbone's serving engine: validate a Submit into a scheduler request, turn a formed batch
into executor work items (pinning each task's extension version), and account the results.

The engine owns no sockets: the daemon's loop feeds it arrivals and sends what it returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fmplexd.backbone import Backbone
from fmplexd.encoder import Encoder
from fmplexd.executor import Executor, WorkItem
from fmplexd.registry import TaskEntry
from fmplexd.scheduler import Batch, Request, Scheduler
from fmplexd.slots import ExtensionView
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import ExtensionSpec, HeadInput, Output, Submit, TaskState


@dataclass(slots=True, eq=False)
class Pending:
    """A queued Submit: who sent it (session + identity), what it asks, and when it arrived."""
    entry: TaskEntry
    session: int
    identity: bytes
    msg: Submit
    arrival: float
    view: ExtensionView | None = None


class Engine:
    """Batches are sized to take about `batch_target_s` (0 = always the fixed `token_budget`):
    the budget follows the measured throughput (an EWMA of tokens/s over batches that filled at
    least half their budget), between MIN_BUDGET and `token_budget`. A forward cannot be
    interrupted, so the batch time bounds how long a newly arrived request of a quiet task waits
    behind a busy neighbour; on a GPU the measured throughput makes the same target allow large
    batches."""

    MIN_BUDGET = 32

    def __init__(self, backbone: Backbone, token_budget: int, max_requests: int,
                 max_request_tokens: int, batch_target_s: float = 0.0, idle_credit: int = 0):
        self.backbone = backbone
        self.scheduler = Scheduler(token_budget, max_requests, idle_credit)
        self.executor = Executor(Encoder(backbone.config, backbone.weights))
        self.max_request_tokens = max_request_tokens
        self.max_budget, self.batch_target_s = token_budget, batch_target_s
        self.tokens_per_s = 0.0

    def warm_up(self, tokens: int = 256) -> None:
        """One throw-away forward (first calls are slow) that also calibrates the budget."""
        view = ExtensionView(0, ExtensionSpec(), [], [], None, None)
        n = max(1, tokens // 32)
        item = WorkItem(view, Output.POOLED, np.full(32 * n, 1000, np.int32), [32] * n)
        self.executor.run([item])
        t0 = time.perf_counter()
        self.executor.run([item])
        self.tokens_per_s = 32 * n / max(time.perf_counter() - t0, 1e-6)
        self._set_budget()

    def observe(self, tokens: int, seconds: float) -> None:
        """A batch of `tokens` took `seconds`: update the throughput estimate and the budget."""
        if seconds > 0 and tokens >= self.scheduler.token_budget // 2:
            rate = tokens / seconds
            self.tokens_per_s = rate if not self.tokens_per_s else 0.8 * self.tokens_per_s + 0.2 * rate
            self._set_budget()

    def horizon(self) -> float:
        """Expected duration of the next full batch (for deadline checks)."""
        return self.scheduler.token_budget / self.tokens_per_s if self.tokens_per_s else 0.0

    def _set_budget(self) -> None:
        if self.batch_target_s and self.tokens_per_s:
            budget = int(self.tokens_per_s * self.batch_target_s)
            self.scheduler.token_budget = max(self.MIN_BUDGET, min(self.max_budget, budget))

    def admit(self, entry: TaskEntry, identity: bytes, msg: Submit, now: float) -> None:
        """Validate and queue a Submit; raises FmplexError (invalid input, oversized, overloaded)."""
        if entry.state is not TaskState.READY or entry.slot.active is None:
            raise FmplexError(ErrorCode.NOT_REGISTERED,
                              f"task {entry.name} has not committed an extension yet")
        cfg, view = self.backbone.config, entry.slot.active
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
        deadline_ms = msg.deadline_ms or entry.config.deadline_ms
        pending = Pending(entry, entry.session, identity, msg, now)
        self.scheduler.submit(Request(entry.session, cost, now + deadline_ms / 1e3, pending, now))

    def work(self, batch: Batch) -> tuple[list[WorkItem], list[Pending]]:
        """Work items for a batch; each pins its task's active extension version."""
        items, pendings = [], []
        for req in batch.requests:
            p: Pending = req.payload
            # A taken request stays in the scheduler's deadline bucket until its deadline (lazy
            # removal): drop the payload, which holds the Submit and its zero-copy frames (each
            # pins a libzmq receive buffer of ~8 KB), or memory grows by rate x deadline.
            req.payload = None
            view = p.entry.slot.active
            if p.entry.session != p.session or view is None:   # task re-registered meanwhile
                continue
            view.in_flight += 1
            p.view = view
            m = p.msg
            items.append(WorkItem(view, m.output, m.ids, m.lengths, m.type_ids))
            pendings.append(p)
        return items, pendings


def release(pendings: list[Pending]) -> None:
    for p in pendings:
        p.view.in_flight -= 1


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

"""One backbone's serving engine: validate a Submit into a scheduler request, turn a formed batch
into executor work items (pinning each task's extension version), and account the results.

The engine owns no sockets: the daemon's loop feeds it arrivals and sends what it returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmplexd.backbone import Backbone
from fmplexd.encoder import Encoder
from fmplexd.executor import Executor, WorkItem
from fmplexd.registry import TaskEntry
from fmplexd.scheduler import Batch, Request, Scheduler
from fmplexd.slots import ExtensionView
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import HeadInput, Output, Submit, TaskState


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
    def __init__(self, backbone: Backbone, token_budget: int, max_requests: int,
                 max_request_tokens: int):
        self.backbone = backbone
        self.scheduler = Scheduler(token_budget, max_requests)
        self.executor = Executor(Encoder(backbone.config, backbone.weights))
        self.max_request_tokens = max_request_tokens

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

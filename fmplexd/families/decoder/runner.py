"""The decoder family's runner: continuous batching of many tasks' sequences over a paged KV pool.

A Generate becomes a Sequence and one scheduler request (cost: its prompt tokens). Each iteration
(`form`) packs, within a row budget sized to about `batch_target_ms`:
    1. one row for every running sequence that is decoding (its last sampled token),
    2. chunks of prompts being prefilled (at least MIN_PREFILL rows per iteration, so new work
       always advances), and
    3. newly admitted prompts: the scheduler's least-served tasks first (`form_batch` with the
       rows and sequence slots left), as long as the KV pool has room for them.
Every decode row is charged to its task at DECODE_PRICE prompt tokens (`Scheduler.charge`); a
prompt is charged when admitted. Prices: a generated token costs 2 prompt tokens. VTC (Sheng et
al., OSDI'24) charges output twice input for GPU serving; on this CPU executor the measured cost of
a decode row at batch 32 is about 2-3 prefill rows (bench/generate.py prints both), so the same
price holds here.

KV: blocks are taken as sequences grow. When the pool runs short, the running sequence of the task
furthest over its share (largest virtual time; the latest admitted among its sequences) is
preempted: its blocks are freed and its request goes back to the head of its task's queue; when it
is admitted again its prompt and the tokens it already generated are recomputed, and it continues
(its sampling generator is kept, so a seeded request still draws the same tokens). A request that
could not fit in an empty pool is refused at admission. Nothing waits on anything else: no
deadlock, and every queued task keeps its place in the fair queue.

Cancel (or the task's session ending) frees a sequence's blocks at once, or at the end of the
iteration that is computing it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable

import torch

from fmplexd.families.base import Backbone, Delivery, Pacer, TaskRef, Work
from fmplexd.families.decoder.forward import DecoderForward, Iteration, SeqRows
from fmplexd.families.decoder.kv import KVPool
from fmplexd.families.decoder.sampling import Sampling, sample
from fmplexd.families.extensions import module_extensions
from fmplexd.scheduler import EXPIRED, Batch, Request, Scheduler
from fmplexd.slots import ExtensionView
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import Error, FinishReason, Generate, Tokens

DECODE_PRICE = 2.0        # scheduler cost of one generated token, in prompt tokens
MIN_PREFILL = 64          # prefill rows an iteration always makes room for


@dataclass(eq=False)
class Sequence:
    """One generation: the request's prompt and what it produced so far."""
    task: TaskRef
    session: int
    msg: Generate
    arrival: float
    deadline_s: float
    tokens: list[int]                 # prompt, then generated tokens
    prompt_len: int
    sampling: Sampling
    stop_ids: frozenset[int]
    req: Request | None = None
    computed: int = 0                 # leading tokens whose k, v are in the pool
    table: list[int] = field(default_factory=list)
    view: ExtensionView | None = None
    chunk: int = 0                    # rows it has in the iteration being computed
    in_flight: bool = False
    cancelled: bool = False
    running: bool = False
    preemptions: int = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class DecoderRunner:
    accepts = frozenset({Generate})
    concurrent = False                 # an iteration reads the state the previous one left

    def __init__(self, backbone: Backbone, settings):
        cfg = backbone.config
        self.backbone, self.cfg = backbone, cfg
        self.forward = DecoderForward(cfg, backbone.weights)
        self.pool = KVPool.sized(settings.kv_pool_mb, cfg.layers, cfg.kv_heads, cfg.head_dim,
                                 settings.kv_block_tokens, self.forward.dtype)
        self.pacer = Pacer(settings.token_budget, settings.batch_target_ms / 1e3)
        self.max_sequences = settings.max_sequences
        gen = backbone.info.generation
        self.eos = frozenset(gen.eos_ids if gen is not None else ())
        self.running: list[Sequence] = []
        self.by_ref: dict[tuple[int, int], Sequence] = {}
        self.preemptions = 0

    # -- the engine's calls -----------------------------------------------------------------

    def warm_up(self, tokens: int = 64) -> None:
        """Two throw-away prefills (first calls are slow); the second calibrates the budget."""
        for _ in range(2):
            table: list[int] = []
            if not self.pool.grow(table, tokens):
                return
            slots = self.pool.slots(table, 0, tokens)
            it = Iteration(torch.full((tokens,), 1, dtype=torch.long), torch.arange(tokens), slots,
                           [SeqRows(0, tokens, 0, slots)], torch.tensor([tokens - 1]))
            t0 = time.perf_counter()
            self.forward(it, self.pool)
            self.pacer.calibrate(tokens, time.perf_counter() - t0)
            self.pool.release(table)

    def busy(self) -> bool:
        return bool(self.running)

    def admit(self, task: TaskRef, msg: Generate, now: float, deadline: float) -> Request:
        """Validate a Generate; its request costs its prompt. Raises FmplexError."""
        prompt = msg.prompt
        n, ctx = len(prompt), self.cfg.max_positions
        if n < 1:
            raise FmplexError(ErrorCode.INVALID_INPUT, "the prompt is empty")
        if int(prompt.min()) < 0 or int(prompt.max()) >= self.cfg.vocab:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"token ids must lie in [0, {self.cfg.vocab})")
        if n >= ctx:
            raise FmplexError(ErrorCode.OVERSIZED, f"a prompt of {n} tokens leaves no room in the "
                              f"{ctx}-token context of backbone {self.backbone.name}")
        if self.pool.blocks_for(n + 1) > self.pool.num_blocks:
            raise FmplexError(ErrorCode.OVERSIZED, f"a prompt of {n} tokens needs more KV than the "
                              f"pool of {self.pool.num_blocks * self.pool.block_size} tokens holds")
        if msg.top_p <= 0:
            raise FmplexError(ErrorCode.INVALID_INPUT, "top_p must be > 0")
        key = (task.session, msg.ref)
        if key in self.by_ref and not self._gone(self.by_ref[key]):
            raise FmplexError(ErrorCode.INVALID_INPUT, f"request {msg.ref} is already generating")
        seq = Sequence(task, task.session, msg, now, deadline - now, [int(t) for t in prompt], n,
                       Sampling.create(msg.temperature, msg.top_p, msg.top_k, msg.seed),
                       frozenset(msg.stop_ids) | (frozenset() if msg.ignore_eos else self.eos))
        seq.req = Request(task.session, n, deadline, seq, now)
        self.by_ref[key] = seq
        return seq.req

    def form(self, scheduler: Scheduler, group: Hashable, now: float) -> Work | None:
        """The next iteration: decodes, prefill chunks, admissions (see the module docstring)."""
        self._prune()
        budget = self.pacer.budget
        decodes = [s for s in self.running if len(s.tokens) - s.computed == 1]
        prefills = [s for s in self.running if len(s.tokens) - s.computed > 1]
        left = max(MIN_PREFILL, budget - len(decodes))
        plan: list[tuple[Sequence, int]] = [(s, 1) for s in decodes]
        for s in prefills:
            if left <= 0:
                break
            chunk = min(len(s.tokens) - s.computed, left)
            plan.append((s, chunk))
            left -= chunk
        batch = Batch([], [], 0, group)
        room = self.max_sequences - len(self.running)
        kv_room = (self.pool.free_blocks - self._blocks_needed(plan)) * self.pool.block_size
        if left > 0 and room > 0 and kv_room > 0:
            batch = scheduler.form_batch(now, self.pacer.horizon(), group, min(left, kv_room), room)
            for req in batch.requests:
                seq: Sequence = req.payload
                if self._gone(seq) or seq.task.session != seq.session:
                    continue
                if seq.view is None:
                    seq.view = seq.task.slot.active
                    if seq.view is None:
                        continue
                    seq.view.in_flight += 1
                seq.running = True
                self.running.append(seq)
                chunk = min(len(seq.tokens) - seq.computed, max(left, 1))
                plan.append((seq, chunk))
                left -= chunk
        plan = self._fit_kv(plan, scheduler, now)
        for s, chunk in plan:
            if chunk == 1 and len(s.tokens) - s.computed == 1:
                scheduler.charge(s.session, DECODE_PRICE)
        work = Work(self, batch, [], [], batch.expired, sum(c for _, c in plan),
                    [(s.session, c) for s, c in plan])
        if plan:
            plan.sort(key=lambda sc: id(sc[0].view))      # each task's rows contiguous
            work.items = [self._iteration(plan)]
            work.pendings = [s for s, _ in plan]          # in row order: draws follow it
            for s, chunk in plan:
                s.chunk, s.in_flight = chunk, True
        return work

    def run(self, work: Work) -> list[int]:
        """In the worker thread: the forward and one draw per sequence that completes its rows."""
        it: Iteration = work.items[0]
        logits = self.forward(it, self.pool)
        samplers = [s.sampling for s in work.pendings if s.computed + s.chunk == len(s.tokens)]
        return sample(logits, samplers)

    def release(self, work: Work) -> None:
        for s in work.pendings:
            s.in_flight = False

    def finish(self, work: Work, outputs, t0: float, t1: float) -> list[Delivery]:
        """Tokens for every sequence that sampled; finished, cancelled or failed ones are freed."""
        out: list[Delivery] = []
        if isinstance(outputs, FmplexError):
            for s in work.pendings:
                out.append(Delivery(s.task, s.session, Error(s.msg.ref, outputs.code,
                                                             outputs.message, epoch=s.session)))
                self._free(s)
            return out
        self.pacer.observe(work.tokens, t1 - t0)
        drawn = iter(outputs)
        for s in work.pendings:
            sampled = s.computed + s.chunk == len(s.tokens)
            s.computed += s.chunk
            s.chunk = 0
            if sampled:
                s.tokens.append(next(drawn))
            if not s.running:                      # forgotten (its session ended) meanwhile
                self._free(s)
                continue
            finish = self._finish_reason(s, sampled)
            if sampled or finish is not None:
                new = [s.tokens[-1]] if sampled else []
                out.append(Delivery(s.task, s.session, self._tokens(s, new, finish),
                                    final=finish is not None,
                                    latency_s=t1 - s.arrival if finish is not None else None))
            if finish is not None:
                self._free(s)
        return out

    # -- cancellation and sessions --------------------------------------------------------------

    def cancel(self, scheduler: Scheduler, session: int, ref: int) -> list[Delivery]:
        """Stop request `ref` of `session`: freed now (answered with its final Tokens, finish
        cancelled) or, if an iteration is computing it, when that iteration finishes."""
        seq = self.by_ref.get((session, ref))
        if seq is None or self._gone(seq) or seq.cancelled:
            return []
        seq.cancelled = True
        if seq.in_flight:
            return []
        if not seq.running:
            scheduler.cancel(seq.req)             # queued (new, or preempted)
        self._free(seq)
        return [Delivery(seq.task, seq.session, self._tokens(seq, [], FinishReason.CANCELLED))]

    def forget(self, session: int) -> list[Sequence]:
        """The session ended (the scheduler has dropped its queue): free its sequences, running
        ones at the end of their iteration if one is computing them. Returns the running ones, so
        the caller can answer their requests."""
        mine = [s for s in self.by_ref.values() if s.session == session]
        running = [s for s in mine if s.running]
        for s in mine:
            if s.in_flight:
                s.running = False                 # freed by finish
                self.by_ref.pop((s.session, s.msg.ref), None)
            else:
                self._free(s)
        return running

    def kv_stats(self) -> dict:
        return {"kv_blocks_total": self.pool.num_blocks, "kv_blocks_used": self.pool.used_blocks,
                "kv_block_tokens": self.pool.block_size,
                "kv_tokens": sum(s.computed for s in self.running), "sequences": len(self.running),
                "preemptions": self.preemptions}

    # -- internals ------------------------------------------------------------------------------

    def _finish_reason(self, s: Sequence, sampled: bool) -> FinishReason | None:
        if s.cancelled:
            return FinishReason.CANCELLED
        if not sampled:
            return None
        if s.tokens[-1] in s.stop_ids:
            return FinishReason.STOP
        if s.generated >= s.msg.max_tokens or len(s.tokens) >= self.cfg.max_positions:
            return FinishReason.LENGTH
        return None

    def _tokens(self, s: Sequence, ids: list[int], finish: FinishReason | None) -> Tokens:
        return Tokens(epoch=s.session, ref=s.msg.ref, ids=ids, finish=finish,
                      prompt_tokens=s.prompt_len, completion_tokens=s.generated,
                      version=s.view.version if s.view is not None else 0)

    def _blocks_needed(self, plan: list[tuple[Sequence, int]]) -> int:
        return sum(max(0, self.pool.blocks_for(s.computed + c) - len(s.table)) for s, c in plan)

    def _fit_kv(self, plan: list[tuple[Sequence, int]], scheduler: Scheduler, now: float
                ) -> list[tuple[Sequence, int]]:
        """Grow every planned sequence's block table; while the pool is short, preempt the running
        sequence of the task furthest over its share and drop it from the plan."""
        while True:
            short = [(s, c) for s, c in plan if not self.pool.grow(s.table, s.computed + c)]
            if not short:
                return plan
            victim = max(self.running, key=lambda s: (scheduler.vtime(s.session)
                                                      if s.session in scheduler else 0.0,
                                                      s.arrival))
            self._preempt(victim, scheduler, now)
            plan = [(s, c) for s, c in plan if s is not victim]

    def _preempt(self, s: Sequence, scheduler: Scheduler, now: float) -> None:
        """Free its blocks and put its request back first in its task's queue; it is recomputed
        (prompt and the tokens it already generated) when admitted again."""
        self.pool.release(s.table)
        s.computed, s.running, s.preemptions = 0, False, s.preemptions + 1
        self.preemptions += 1
        self.running.remove(s)
        s.req.cost = len(s.tokens)
        s.req.deadline = now + s.deadline_s
        try:
            scheduler.requeue(s.req)
        except KeyError:                          # its task is gone
            self._free(s)

    def _free(self, s: Sequence) -> None:
        """Return its blocks, unpin its extension version, forget it."""
        self.pool.release(s.table)
        if s.view is not None:
            s.view.in_flight -= 1
            s.view = None
        if s in self.running:
            self.running.remove(s)
        s.running = False
        self.by_ref.pop((s.session, s.msg.ref), None)

    @staticmethod
    def _gone(s: Sequence) -> bool:
        return s.req is not None and s.req.state == EXPIRED

    def _prune(self) -> None:
        """Forget requests the scheduler expired while they were queued."""
        for key in [k for k, s in self.by_ref.items() if self._gone(s)]:
            s = self.by_ref.pop(key)
            if s.view is not None and not s.running:
                s.view.in_flight -= 1
                s.view = None

    def _iteration(self, plan: list[tuple[Sequence, int]]) -> Iteration:
        """Rows of the planned sequences in plan order (the caller groups each task's sequences,
        so each task's rows form one extension segment)."""
        ids, positions, slots, parts, sample_rows, task_rows = [], [], [], [], [], []
        row = 0
        for s, chunk in plan:
            start = s.computed
            ids.extend(s.tokens[start:start + chunk])
            positions.append(torch.arange(start, start + chunk))
            row_slots = self.pool.slots(s.table, start, chunk)
            slots.append(row_slots)
            parts.append(SeqRows(row, chunk, start, self.pool.slots(s.table, 0, start + chunk)))
            if start + chunk == len(s.tokens):
                sample_rows.append(row + chunk - 1)
            if task_rows and task_rows[-1][0] is s.view:
                task_rows[-1] = (s.view, task_rows[-1][1], row + chunk)
            else:
                task_rows.append((s.view, row, row + chunk))
            row += chunk
        return Iteration(torch.tensor(ids, dtype=torch.long), torch.cat(positions),
                         torch.cat(slots), parts, torch.tensor(sample_rows, dtype=torch.long),
                         module_extensions(task_rows))

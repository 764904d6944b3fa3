"""The text-encoder family's executor: one encoder forward for a batch of requests of many tasks.

`Executor.run(items)` packs every sequence of every item back to back (no padding to the longest;
attention is bucketed by length in kernels.attention), with each task's rows contiguous so its
LoRA / IA3 / head apply as one segment. Per item it returns what the item asked for:
    pooled        (n, H)        CLS or mean pooling per the task's spec (virtual tokens included,
                                as PEFT's models see them)
    logits        (n, L)        the task's head on the pooled rows
    tokens        (sum len, H)  hidden states of the real tokens (virtual rows dropped)
    token_logits  (sum len, L)  the task's head on each real token
Items must already be validated (ids in vocabulary, lengths within positions, head present).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from fmplexd.families.encoder.forward import Encoder, PackedInput
from fmplexd.families.extensions import module_extensions
from fmplexd.slots import ExtensionView
from ipc.messages import Output, Pooling
from kernels.attention import plan_varlen
from kernels.heads import segmented_head

_ORDER = {Output.POOLED: 0, Output.LOGITS: 1, Output.TOKENS: 2, Output.TOKEN_LOGITS: 3}


@dataclass(slots=True)
class WorkItem:
    view: ExtensionView
    output: Output
    ids: np.ndarray                  # (sum len,) int32, sequences concatenated
    lengths: list[int]
    type_ids: np.ndarray | None = None


@dataclass(slots=True)
class _Layout:
    """Where things are in the packed batch (sequence order = sorted item order)."""
    order: list[int]                 # item indices in packed order
    seq_start: np.ndarray            # (S,) first row of each sequence
    seq_len: np.ndarray              # (S,) rows of each sequence incl. virtual
    item_seqs: list[tuple[int, int]]      # per packed item: sequence range
    item_tokens: list[tuple[int, int]]    # per packed item: range in real-token order
    task_rows: list[tuple[ExtensionView, int, int]]   # per task: packed row range


class Executor:
    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    @torch.inference_mode()
    def run(self, items: list[WorkItem]) -> list[np.ndarray]:
        lay, packed, is_virtual = self._pack(items)
        hidden = self.encoder.forward(packed)                               # (T, H)
        return self._outputs(items, lay, hidden, is_virtual)

    # -- packing ---------------------------------------------------------------------------

    def _pack(self, items: list[WorkItem]):
        groups: dict[int, int] = {}
        for i, it in enumerate(items):
            groups.setdefault(id(it.view), len(groups))
        order = sorted(range(len(items)), key=lambda i: (groups[id(items[i].view)],
                                                         _ORDER[items[i].output]))
        n_virt, real_len, ids, types = [], [], [], []
        item_seqs, item_tokens, task_rows = [], [], []
        seq_count = tok_count = row = 0
        for i in order:
            it = items[i]
            nv = it.view.prompt_tokens
            item_seqs.append((seq_count, seq_count + len(it.lengths)))
            item_tokens.append((tok_count, tok_count + len(it.ids)))
            seq_count += len(it.lengths)
            tok_count += len(it.ids)
            n_virt += [nv] * len(it.lengths)
            real_len += it.lengths
            ids.append(it.ids)
            types.append(it.type_ids if it.type_ids is not None else np.zeros(len(it.ids), np.int8))
            rows = len(it.ids) + nv * len(it.lengths)
            if task_rows and task_rows[-1][0] is it.view:
                view, s, _ = task_rows[-1]
                task_rows[-1] = (view, s, row + rows)
            else:
                task_rows.append((it.view, row, row + rows))
            row += rows
        n_virt_a = np.asarray(n_virt, np.int64)
        seq_len = n_virt_a + np.asarray(real_len, np.int64)
        seq_start = np.concatenate(([0], np.cumsum(seq_len)[:-1]))
        total = int(seq_len.sum())
        pos = np.arange(total, dtype=np.int64) - np.repeat(seq_start, seq_len)   # position in seq
        is_virtual = pos < np.repeat(n_virt_a, seq_len)
        ids_full = np.zeros(total, np.int64)
        ids_full[~is_virtual] = np.concatenate(ids)
        type_full = np.zeros(total, np.int64)
        type_full[~is_virtual] = np.concatenate(types)
        packed = PackedInput(
            ids=torch.from_numpy(ids_full), type_ids=torch.from_numpy(type_full),
            positions=torch.from_numpy(pos + self.encoder.cfg.position_offset),
            plan=plan_varlen(seq_start.tolist(), seq_len.tolist()))
        if is_virtual.any():
            self._place_prompts(packed, task_rows, pos, is_virtual)
        packed.ext = module_extensions(task_rows)
        lay = _Layout(order, seq_start, seq_len, item_seqs, item_tokens, task_rows)
        return lay, packed, torch.from_numpy(is_virtual)

    @staticmethod
    def _place_prompts(packed: PackedInput, task_rows, pos: np.ndarray, is_virtual: np.ndarray):
        prompts, offsets, base = [], np.zeros(len(pos), np.int64), 0
        for view, s, e in task_rows:
            if view.prompt is not None:
                prompts.append(view.prompt)
                offsets[s:e] = base
                base += view.prompt.shape[0]
        rows = np.flatnonzero(is_virtual)
        packed.prompt_rows = torch.from_numpy(rows)
        packed.prompt_values = torch.cat(prompts)[torch.from_numpy(offsets[rows] + pos[rows])]

    # -- outputs ---------------------------------------------------------------------------

    def _outputs(self, items, lay: _Layout, hidden: torch.Tensor, is_virtual: torch.Tensor):
        kinds = {it.output for it in items}
        pooled = self._pool(hidden, lay) if kinds & {Output.POOLED, Output.LOGITS} else None
        real = hidden[~is_virtual] if kinds & {Output.TOKENS, Output.TOKEN_LOGITS} else None
        heads = self._heads(items, lay, pooled, real)
        results: list[np.ndarray | None] = [None] * len(items)
        for k, i in enumerate(lay.order):
            out = items[i].output
            if out is Output.POOLED:
                s, e = lay.item_seqs[k]
                results[i] = pooled[s:e]
            elif out is Output.TOKENS:
                s, e = lay.item_tokens[k]
                results[i] = real[s:e]
            else:
                results[i] = heads[k]
        return [r.float().contiguous().numpy() for r in results]

    @staticmethod
    def _pool(hidden: torch.Tensor, lay: _Layout) -> torch.Tensor:
        """(S, H): per sequence, the CLS row or the mean of its rows, per its task's pooling."""
        starts = torch.from_numpy(lay.seq_start)
        lens = torch.from_numpy(lay.seq_len)
        seg = torch.repeat_interleave(torch.arange(len(lens)), lens)
        mean = torch.zeros(len(lens), hidden.shape[1], dtype=hidden.dtype).index_add_(0, seg, hidden)
        mean /= lens[:, None].to(hidden.dtype)
        cls = hidden[starts]
        use_cls = torch.zeros(len(lens), dtype=torch.bool)
        for view, s, e in lay.task_rows:
            if view.pooling is Pooling.CLS:
                use_cls |= (starts >= s) & (starts < e)
        return torch.where(use_cls[:, None], cls, mean)

    @staticmethod
    def _heads(items, lay: _Layout, pooled, real) -> dict[int, torch.Tensor]:
        """Head outputs per packed item index; one head segment per run of items of one task."""
        out: dict[int, torch.Tensor] = {}
        for kind, x, ranges in ((Output.LOGITS, pooled, lay.item_seqs),
                                (Output.TOKEN_LOGITS, real, lay.item_tokens)):
            blocks: list[list] = []          # [view, start, end, packed item indices]
            for k, i in enumerate(lay.order):
                it = items[i]
                if it.output is not kind:
                    continue
                s, e = ranges[k]
                if blocks and blocks[-1][0] is it.view and blocks[-1][2] == s:
                    blocks[-1][2] = e
                    blocks[-1][3].append(k)
                else:
                    blocks.append([it.view, s, e, [k]])
            if not blocks:
                continue
            results = segmented_head(x, [replace(v.head, start=s, end=e) for v, s, e, _ in blocks])
            for (_, s, _, members), res in zip(blocks, results):
                for k in members:
                    a, b = ranges[k]
                    out[k] = res[a - s:b - s]
        return out

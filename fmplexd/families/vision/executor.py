"""The vision family's executor: one forward for a batch of image requests of many tasks.

`Executor.run(items)` embeds every item's images, packs all their rows back to back with each
task's rows contiguous (its LoRA / IA3 apply as one segment) and runs one forward; attention stays
within each image (kernels.attention buckets images by row count). Per item it returns:
    pooled   (n, D)            per image the CLS row or the mean of its patch rows (the task's
                               pooling)
    logits   (n, L)            the task's head on the pooled rows
    tokens   (n * S, D)        every row of every image, CLS first
Items must already be validated (pixels (n, C, H, W) with H, W multiples of the patch; head
present for logits).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from fmplexd.families.extensions import module_extensions
from fmplexd.families.vision.forward import PackedImages, VisionTransformer
from fmplexd.slots import ExtensionView
from ipc.messages import Output, Pooling
from kernels.attention import plan_varlen
from kernels.heads import segmented_head


@dataclass(slots=True)
class WorkItem:
    view: ExtensionView
    output: Output
    pixels: np.ndarray               # (n, C, H, W) float32


class Executor:
    def __init__(self, model: VisionTransformer):
        self.model = model

    @torch.inference_mode()
    def run(self, items: list[WorkItem]) -> list[np.ndarray]:
        groups: dict[int, int] = {}
        for it in items:
            groups.setdefault(id(it.view), len(groups))
        order = sorted(range(len(items)), key=lambda i: groups[id(items[i].view)])
        embedded = [self.model.embed(torch.from_numpy(np.asarray(items[i].pixels)))
                    for i in order]                                            # (n_i, S_i, D)
        starts, lengths, task_rows, row = [], [], [], 0
        for i, e in zip(order, embedded):
            n, s = e.shape[:2]
            starts += range(row, row + n * s, s)
            lengths += [s] * n
            view = items[i].view
            if task_rows and task_rows[-1][0] is view:
                task_rows[-1] = (view, task_rows[-1][1], row + n * s)
            else:
                task_rows.append((view, row, row + n * s))
            row += n * s
        x = torch.cat([e.reshape(-1, e.shape[-1]) for e in embedded])            # (T, D)
        batch = PackedImages(x, plan_varlen(starts, lengths), module_extensions(task_rows))
        hidden = self.model.forward(batch)
        results: list[np.ndarray | None] = [None] * len(items)
        row = 0
        for i, e in zip(order, embedded):
            n, s = e.shape[:2]
            rows = hidden[row:row + n * s].view(n, s, -1)
            row += n * s
            results[i] = _output(items[i], rows).float().contiguous().numpy()
        return results


def _output(item: WorkItem, rows: torch.Tensor) -> torch.Tensor:
    """rows (n, S, D) of one item's images -> what the item asked for."""
    if item.output is Output.TOKENS:
        return rows.reshape(-1, rows.shape[-1])
    pooled = rows[:, 0] if item.view.pooling is Pooling.CLS else rows[:, 1:].mean(dim=1)
    if item.output is Output.POOLED:
        return pooled
    return segmented_head(pooled, [replace(item.view.head, start=0, end=len(pooled))])[0]

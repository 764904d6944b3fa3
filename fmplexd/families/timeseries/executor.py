"""The time-series family's executor: one forward for a batch of series requests of many tasks.

`Executor.run(items)` right-aligns every series of every item in the model's window (left
padding and NaN steps unobserved, value 0), each task's series contiguous (its extensions apply
as one segment), and runs one forward (the forecast head only if an item asks for forecasts). Per
item it returns:
    forecast  (n * H, Q)     the native horizon's quantiles, normalised units, series-major
    pooled    (n, D)         the mean of the features of the observed steps (pooling mean) or
                             the last step's features (pooling cls)
    logits    (n, L)         the task's head on the pooled rows
Items must already be validated (values (n, T), T <= W, enough finite values).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from fmplexd.families.extensions import module_extensions
from fmplexd.families.timeseries.forward import Fracast
from fmplexd.slots import ExtensionView
from ipc.messages import Output, Pooling
from kernels.heads import segmented_head


@dataclass(slots=True)
class WorkItem:
    view: ExtensionView
    output: Output
    values: np.ndarray               # (n, T) float32 normalised, NaN = unobserved


class Executor:
    def __init__(self, model: Fracast):
        self.model = model

    @torch.inference_mode()
    def run(self, items: list[WorkItem]) -> list[np.ndarray]:
        W = self.model.cfg.context
        groups: dict[int, int] = {}
        for it in items:
            groups.setdefault(id(it.view), len(groups))
        order = sorted(range(len(items)), key=lambda i: groups[id(items[i].view)])
        B = sum(len(items[i].values) for i in order)
        v = np.zeros((B, W), np.float32)
        m = np.zeros((B, W), bool)
        spans, task_rows, row = [], [], 0
        for i in order:
            it = items[i]
            n, T = it.values.shape
            observed = np.isfinite(it.values)
            v[row:row + n, W - T:] = np.where(observed, it.values, np.float32(0.0))
            m[row:row + n, W - T:] = observed
            spans.append((row, row + n))
            if task_rows and task_rows[-1][0] is it.view:
                task_rows[-1] = (it.view, task_rows[-1][1], row + n)
            else:
                task_rows.append((it.view, row, row + n))
            row += n
        vt, mt = torch.from_numpy(v), torch.from_numpy(m)
        forecast = any(it.output is Output.FORECAST for it in items)
        h, q = self.model.forward(vt, mt, module_extensions(task_rows), forecast)
        results: list[np.ndarray | None] = [None] * len(items)
        for i, (s, e) in zip(order, spans):
            results[i] = _output(items[i], h[s:e], mt[s:e], None if q is None else q[s:e])
        return results


def _output(item: WorkItem, h: torch.Tensor, m: torch.Tensor, q: torch.Tensor | None) -> np.ndarray:
    """One item's rows: h (n, W, D), m (n, W), q (n, H, Q) -> what the item asked for."""
    if item.output is Output.FORECAST:
        out = q.reshape(-1, q.shape[-1])
    else:
        if item.view.pooling is Pooling.CLS:
            pooled = h[:, -1]
        else:
            w = m.to(h.dtype)[..., None]
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        out = pooled if item.output is Output.POOLED else segmented_head(
            pooled, [replace(item.view.head, start=0, end=len(pooled))])[0]
    return out.float().contiguous().numpy()

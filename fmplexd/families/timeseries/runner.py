"""The time-series family's runner: a SubmitSeries costs W steps per series (the forward always
runs the whole window, whatever the series' length) and runs in one batched forward with other
tasks' series (fmplexd.families.batch_runner: batches, pinned extension versions, Results).

A step is far cheaper than a transformer token (a depthwise convolution and 64-wide linears), so
the batch budget's cap is STEPS_PER_TOKEN steps per configured token (token_budget 4096: 32 series
of 2048 steps); the pacer sizes batches by the measured steps per second within it, and the
engine prices steps by the same measurement, so the fair share stays one of device time.
"""
from __future__ import annotations

import numpy as np

from fmplexd.families.base import Backbone
from fmplexd.families.batch_runner import BatchRunner, bare_view, oversized
from fmplexd.families.timeseries.executor import Executor, WorkItem
from fmplexd.families.timeseries.forward import Fracast
from fmplexd.slots import ExtensionView
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import MAX_SERIES, Output, SubmitSeries

STEPS_PER_TOKEN = 16


class SeriesRunner(BatchRunner):
    accepts = frozenset({SubmitSeries})
    outputs = frozenset({Output.FORECAST, Output.POOLED, Output.LOGITS})

    def __init__(self, backbone: Backbone, token_budget: int, max_requests: int,
                 batch_target_s: float = 0.0):
        cfg = backbone.config
        budget = max(token_budget * STEPS_PER_TOKEN, cfg.context)
        super().__init__(backbone, budget, max_requests, batch_target_s)
        self.executor = Executor(Fracast(cfg, backbone.weights))

    def warm_item(self) -> tuple[WorkItem, int]:
        W = self.backbone.config.context
        values = np.sin(np.arange(W, dtype=np.float32) / 7.0)[None] * 0.5 + 0.5
        return WorkItem(bare_view(), Output.FORECAST, values), W

    def cost(self, msg: SubmitSeries, view: ExtensionView) -> int:
        """Validate the series against the backbone; the cost is W steps per series."""
        info = self.backbone.info.series
        n, T = msg.values.shape
        if not 1 <= n <= MAX_SERIES or T < 1:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"values must be (n, T) with 1 <= n <= "
                              f"{MAX_SERIES} and T >= 1; got {list(msg.values.shape)}")
        if T > info.context:
            raise oversized(f"a series of {T} steps", info.context, self.backbone)
        values = msg.values
        observed = np.isfinite(values)
        if (observed.sum(axis=1) < info.min_observed).any():
            raise FmplexError(ErrorCode.INVALID_INPUT, f"each series needs at least "
                              f"{info.min_observed} finite values")
        if np.isinf(values).any() or np.abs(np.where(observed, values, 0)).max() > 1e6:
            raise FmplexError(ErrorCode.INVALID_INPUT, "values must be normalised (finite, "
                              "|v| <= 1e6; NaN marks a missing value)")
        return n * info.context

    def item(self, msg: SubmitSeries, view: ExtensionView) -> WorkItem:
        return WorkItem(view, msg.output, msg.values)

    def execute(self, items: list[WorkItem]) -> list[np.ndarray]:
        return self.executor.run(items)

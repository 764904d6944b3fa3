"""Time-series pipelines: normalise each series as the backbone's release does, submit, and turn
the executor's output back into the series' units (numpy only; no torch).

    window      the last W values of each series (W = BackboneInfo.series.context; older ones are
                dropped and the series marked truncated), NaN where missing; at least
                `min_observed` finite values
    normalise   loc = min, span = max(max - loc, 1e-5) over the window's finite values (float64),
                v = (x - loc) / span as float32, NaN kept (the daemon treats it as unobserved)
    time-series-forecasting     Result (n * H, Q) normalised quantiles -> q * span + loc; a horizon
                beyond the native H is forecast block by block: the block's median is appended to
                the series and the window normalised again (as fracast's own forecast() does)
                -> ForecastReply forecast (n, horizon, len(quantiles))
    time-series-classification  softmax over the head's logits, top-k  -> InferReply labels
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ipc.errors import ErrorCode, FmplexError
from ipc.messages import (BackboneInfo, ForecastReply, InferReply, InferSeries, Output, Result,
                          SeriesInfo, SubmitSeries)
from ipc.spec import Pipeline, TaskSpec
from tasklets.pipelines.post import labelled


@dataclass(slots=True)
class Window:
    values: np.ndarray          # (n, <= W) float32, normalised, NaN = unobserved
    loc: np.ndarray             # (n, 1) float64
    span: np.ndarray            # (n, 1) float64


def normalise(rows: np.ndarray, info: SeriesInfo) -> Window:
    """The last `context` values of each row, normalised as the module docstring states."""
    tail = np.asarray(rows[:, -info.context:], dtype=np.float32)
    observed = np.isfinite(tail)
    short = np.flatnonzero(observed.sum(axis=1) < info.min_observed)
    if len(short):
        raise FmplexError(ErrorCode.INVALID_INPUT, f"series {int(short[0])} has fewer than "
                          f"{info.min_observed} finite values in its last {info.context}")
    finite = np.where(observed, tail, np.float32(np.nan))
    loc = np.nanmin(finite, axis=1, keepdims=True).astype(np.float64)
    span = np.maximum(np.nanmax(finite, axis=1, keepdims=True) - loc, 1e-5).astype(np.float64)
    values = np.where(observed, (tail - loc) / span, np.nan).astype(np.float32)
    return Window(values, loc, span)


class SeriesPipeline:
    """InferSeries -> normalise -> SubmitSeries (one per native horizon block) -> Result(s) ->
    ForecastReply or InferReply."""

    accepts = frozenset({InferSeries})

    def __init__(self, spec: TaskSpec, info: BackboneInfo, prompt_tokens: int = 0):
        if info.series is None:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"backbone {info.name} takes no series")
        self.spec, self.info = spec, info.series
        q = np.asarray(self.info.quantiles)
        self.median = int(np.argmin(np.abs(q - 0.5)))

    def quantile_index(self, wanted: list[float] | None) -> list[int]:
        have = self.info.quantiles
        if wanted is None:
            return list(range(len(have)))
        out = []
        for q in wanted:
            match = [i for i, h in enumerate(have) if abs(h - q) < 1e-9]
            if not match:
                raise FmplexError(ErrorCode.INVALID_INPUT, f"quantile {q} is not one the backbone "
                                  f"forecasts ({have})")
            out.append(match[0])
        return out

    async def serve(self, msg: InferSeries, call, send, deadline_ms: int):
        rows = np.asarray(msg.values, dtype=np.float32)
        truncated = (np.isfinite(rows[:, :-self.info.context]).any(axis=1)
                     if rows.shape[1] > self.info.context else np.zeros(len(rows), bool))
        truncated = [bool(t) for t in truncated]
        if self.spec.pipeline is Pipeline.SERIES_CLASSIFICATION:
            if msg.horizon or msg.quantiles is not None:
                raise FmplexError(ErrorCode.INVALID_INPUT, "a classification task takes no "
                                  "horizon or quantiles")
            result: Result = await call.request(SubmitSeries, output=Output.LOGITS,
                                                values=normalise(rows, self.info).values,
                                                deadline_ms=deadline_ms)
            return InferReply(ref=msg.ref, task=call.task, version=result.version,
                              truncated=truncated,
                              labels=labelled(result.data, self.spec.labels,
                                              msg.top_k or self.spec.top_k))
        index = self.quantile_index(msg.quantiles)
        version, forecast = await self.forecast(rows, msg.horizon or self.info.horizon, call,
                                                deadline_ms)
        return ForecastReply(ref=msg.ref, task=call.task, version=version,
                             quantiles=[self.info.quantiles[i] for i in index],
                             forecast=np.ascontiguousarray(forecast[:, :, index]),
                             truncated=truncated)

    async def forecast(self, rows: np.ndarray, horizon: int, call, deadline_ms: int
                       ) -> tuple[int, np.ndarray]:
        """(extension version, (n, horizon, Q) float32 quantiles in the series' units)."""
        n, H, Q = len(rows), self.info.horizon, len(self.info.quantiles)
        out = np.empty((n, horizon, Q), np.float32)
        source, done, version = rows, 0, 0
        while done < horizon:
            window = normalise(source, self.info)
            result: Result = await call.request(SubmitSeries, output=Output.FORECAST,
                                                values=window.values, deadline_ms=deadline_ms)
            version = result.version
            block = result.data.reshape(n, H, Q) * window.span[:, None] + window.loc[:, None]
            take = min(H, horizon - done)
            out[:, done:done + take] = block[:, :take]
            done += take
            if done < horizon:
                median = block[:, :, self.median].astype(np.float32)
                source = np.concatenate((source[:, -self.info.context:], median), axis=1)
        return version, out

"""Time-series forecasters (Fracast-0): release directories; one batched multi-task forward per
batch of series."""
from __future__ import annotations

from fmplexd.families.timeseries.loader import detect, load
from ipc.messages import Family

FAMILY = Family.TIME_SERIES


def make_runner(backbone, settings):
    from fmplexd.families.timeseries.runner import SeriesRunner
    return SeriesRunner(backbone, settings.token_budget, settings.max_batch_requests,
                        settings.batch_target_ms / 1e3)


__all__ = ["FAMILY", "detect", "load", "make_runner"]

"""Iteration plans (full run and --quick), goals and constants shared by the IPC benchmarks."""
from __future__ import annotations

import dataclasses
import time

perf_ns = time.perf_counter_ns

GOAL_SMALL_P50_US = 60.0
GOAL_IMPORT_US = 1000.0
GOAL_IMPORT_RSS_MB = 5.0
REGION_ELEMS = 25_000_000              # float32: 100 MB
TENSOR_1MIB_SHAPE = (256, 1024)        # float32: 1 MiB
IMPORT_TOKEN = b"bench-token"
STOP = b"STOP"                         # not a valid message: every echo mode ends its loop on it


@dataclasses.dataclass(frozen=True)
class Plan:
    codec_target_s: float     # wall time of one repeat of one (message, operation)
    codec_repeats: int
    small_iters: int
    small_warmup: int
    large_iters: int
    large_warmup: int
    imports: int


FULL = Plan(codec_target_s=0.02, codec_repeats=5, small_iters=5000, small_warmup=500,
            large_iters=500, large_warmup=50, imports=50)
QUICK = Plan(codec_target_s=0.002, codec_repeats=5, small_iters=600, small_warmup=100,
             large_iters=60, large_warmup=10, imports=15)

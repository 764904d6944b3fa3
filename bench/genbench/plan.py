"""Plans of the generation benchmark (full and --quick) and its goals."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

GOAL_THROUGHPUT_VS_STATIC = 2.0      # saturation output tokens/s, fmplex / static batching
GOAL_TTFT_P99_VS_STATIC = 0.5        # TTFT p99 at 50% load, fmplex / static batching
GOAL_LORA_OVERHEAD = 0.20            # 8 rank-16 adapters on all 7 modules vs the base, 32 rows
GOAL_KV_UTILIZATION = 0.90           # tokens held / slots of the blocks in use, under load
GOAL_WEIGHT_SHARE = 0.05             # served tokens of weights 1:2:4, relative error per task


@dataclass(frozen=True, slots=True)
class Plan:
    backbone: str = "embedded:smollm2"
    task_counts: tuple[int, ...] = (8, 32)
    rank: int = 16
    saturation_requests: int = 48
    load_fractions: tuple[float, ...] = (0.5, 0.8)
    load_duration_s: float = 60.0
    prompt: tuple[int, int] = (32, 256)
    output: tuple[int, int] = (16, 128)
    static_batch: int = 16               # requests per static batch (transformers + PEFT)
    colocated_max_tasks: int = 8         # more instances than this do not fit in memory here
    kv_pool_mb: float = 512.0
    max_sequences: int = 64
    batch_target_ms: int = 50
    threads: int = max(1, (os.cpu_count() or 2) - 1)
    fairness_s: float = 40.0
    micro_steps: int = 20
    int8_prompts: int = 8                # int8 vs float32: greedy decodes at batch 1
    int8_steps: int = 32
    seed: int = 0
    colocated: bool = True
    tiny: bool = False                   # a tiny random Llama instead of the real backbone


FULL = Plan()
QUICK = dataclasses.replace(FULL, task_counts=(4,), saturation_requests=8, load_fractions=(0.5,),
                            load_duration_s=4.0, prompt=(8, 32), output=(4, 16), static_batch=4,
                            colocated_max_tasks=4, kv_pool_mb=16.0, fairness_s=4.0,
                            micro_steps=3, int8_prompts=2, int8_steps=4, tiny=True)

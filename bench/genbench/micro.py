"""LoRA overhead of the decoder forward: one 32-row decode step (each row a sequence with a
128-token context in the KV pool) of the base model vs the same step with 8 distinct rank-16
adapters on all 7 target modules (4 rows each: the daemon's segment form, rows grouped by task).
Also the LoRA math alone, per layer and module, in the segment form the daemon runs and in the
gather form (one row per request, stacked adapters: kernels.lora.gathered_lora)."""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

ROWS, ADAPTERS, CONTEXT = 32, 8, 128


def lora_overhead(backbone, adapter_dirs: list[str], steps: int) -> dict:
    from fmplexd.families.decoder.forward import DecoderForward, Iteration, SeqRows
    from fmplexd.families.decoder.kv import KVPool
    from fmplexd.families.extensions import module_extensions
    from tasklets.adapters import build_extension
    from testkit.extensions import commit_extension
    cfg = backbone.config
    fw = DecoderForward(cfg, backbone.weights)
    pool = KVPool.holding(ROWS, CONTEXT + 1, cfg.layers, cfg.kv_heads, cfg.head_dim, 16, fw.dtype)
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(ROWS):                                  # fill each context once
        table: list[int] = []
        if not pool.grow(table, CONTEXT + 1):
            raise RuntimeError("the micro benchmark's KV pool is too small")
        slots = pool.slots(table, 0, CONTEXT)
        it = Iteration(torch.from_numpy(rng.integers(100, cfg.vocab - 1, CONTEXT)),
                       torch.arange(CONTEXT), slots, [SeqRows(0, CONTEXT, 0, slots)],
                       torch.tensor([CONTEXT - 1]))
        fw(it, pool)
        tables.append(table)
    views = [commit_extension(build_extension(backbone.info.targets, d), backbone.info, f"m{i}")
             for i, d in enumerate(adapter_dirs[:ADAPTERS])]
    per = ROWS // ADAPTERS
    task_rows = [(v, i * per, (i + 1) * per) for i, v in enumerate(views)]
    parts = [SeqRows(i, 1, CONTEXT, pool.slots(t, 0, CONTEXT + 1)) for i, t in enumerate(tables)]

    def step(ext) -> float:
        it = Iteration(torch.from_numpy(rng.integers(100, cfg.vocab - 1, ROWS)),
                       torch.full((ROWS,), CONTEXT), torch.cat([pool.slots(t, CONTEXT, 1)
                                                                 for t in tables]),
                       parts, torch.arange(ROWS), ext)
        t0 = time.perf_counter()
        fw(it, pool)
        return time.perf_counter() - t0

    ext = module_extensions(task_rows)
    step({}), step(ext)                                     # warm
    base, lora = [], []
    for _ in range(steps):                                  # interleaved: the same machine speed
        base.append(step({}))
        lora.append(step(ext))
    b, l = statistics.median(base), statistics.median(lora)
    kernels = _kernels(views, cfg, ROWS // ADAPTERS, steps)
    return {"rows": ROWS, "adapters": ADAPTERS, "rank": views[0].lora[0][2].shape[0],
            "modules_per_layer": len({m for _, m, *_ in views[0].lora}), "context": CONTEXT,
            "base_step_ms": b * 1e3, "lora_step_ms": l * 1e3, "overhead": l / b - 1, **kernels}


def _kernels(views, cfg, per: int, steps: int) -> dict:
    """The LoRA math alone over every (layer, module) of a 32-row batch: segments vs gather."""
    from kernels.lora import LoraSegment, gathered_lora, segmented_lora
    by_key: dict = {}
    for i, v in enumerate(views):
        for layer, module, A, B, scale in v.lora:
            by_key.setdefault((layer, module), []).append((i, A, B, scale))
    seg_t, gat_t = [], []
    adapter = torch.arange(len(views)).repeat_interleave(per)
    prepared = []
    for entries in by_key.values():
        fan_in, fan_out = entries[0][1].shape[1], entries[0][2].shape[0]
        x = torch.randn(len(adapter), fan_in)
        segs = [LoraSegment(i * per, (i + 1) * per, A, B, s) for i, A, B, s in entries]
        A = torch.stack([e[1] for e in entries])
        B = torch.stack([e[2] for e in entries])
        ranks = torch.tensor([e[1].shape[0] for e in entries])
        scales = torch.tensor([e[3] for e in entries])
        prepared.append((x, segs, A, B, ranks, scales, fan_out))
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        for x, segs, *_, fan_out in prepared:
            segmented_lora(torch.zeros(x.shape[0], fan_out), x, segs)
        t1 = time.perf_counter()
        for x, _, A, B, ranks, scales, fan_out in prepared:
            gathered_lora(torch.zeros(x.shape[0], fan_out), x, adapter, A, B, ranks, scales)
        t2 = time.perf_counter()
        seg_t.append(t1 - t0)
        gat_t.append(t2 - t1)
    return {"lora_math_segments_ms": statistics.median(seg_t[1:]) * 1e3,
            "lora_math_gather_ms": statistics.median(gat_t[1:]) * 1e3}

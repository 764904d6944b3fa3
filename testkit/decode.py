"""Greedy decoding of one sequence on the daemon's own DecoderForward, in-process (no daemon): the
reference the int8 benchmark and tests compare against."""
from __future__ import annotations

import time

import torch

from fmplexd.families.decoder.forward import DecoderForward, Iteration, SeqRows
from fmplexd.families.decoder.kv import KVPool

BLOCK = 16                # token slots per KV block of the private pool


def greedy_decode(fw: DecoderForward, cfg, prompt: list[int], steps: int,
                  forced: list[int] | None = None) -> tuple[list[int], list[float]]:
    """Greedy tokens after `prompt` (the argmax of each step) and each decode step's seconds;
    with `forced`, those tokens are fed instead of the argmax."""
    n = len(prompt)
    pool = KVPool.holding(1, n + steps, cfg.layers, cfg.kv_heads, cfg.head_dim, BLOCK, fw.dtype)
    table: list[int] = []
    if not pool.grow(table, n + steps):
        raise RuntimeError("greedy_decode: KV pool too small")
    slots = pool.slots(table, 0, n)
    logits = fw(Iteration(torch.tensor(prompt), torch.arange(n), slots,
                          [SeqRows(0, n, 0, slots)], torch.tensor([n - 1])), pool)
    picked, times = [int(logits[0].argmax())], []
    for s in range(steps - 1):
        pos = n + s
        tok = forced[s] if forced is not None else picked[-1]
        it = Iteration(torch.tensor([tok]), torch.tensor([pos]), pool.slots(table, pos, 1),
                       [SeqRows(0, 1, pos, pool.slots(table, 0, pos + 1))], torch.tensor([0]))
        t0 = time.perf_counter()
        logits = fw(it, pool)
        times.append(time.perf_counter() - t0)
        picked.append(int(logits[0].argmax()))
    return picked, times

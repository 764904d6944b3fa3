"""Next-token choice per row, each row with its own settings and its own seeded generator, so a
seeded request draws the same tokens whatever it is batched with.

    temperature == 0         argmax (greedy)
    otherwise                p = softmax(logits / temperature), restricted to the top_k most
                             likely tokens (top_k > 0) and to the smallest set whose probability
                             reaches top_p (nucleus), renormalised; one draw with the row's
                             torch.Generator
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, temperature: float, top_p: float, top_k: int, seed: int | None) -> "Sampling":
        gen = None
        if temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
        return cls(temperature, top_p, top_k, gen)


def sample(logits: torch.Tensor, rows: list[Sampling]) -> list[int]:
    """logits (S, V) float32 -> one token id per row."""
    out = []
    greedy = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(rows):
        if s.temperature <= 0:
            out.append(greedy[i])
            continue
        z = logits[i] / s.temperature
        if 0 < s.top_k < z.shape[0]:
            kth = torch.topk(z, s.top_k).values[-1]
            z = z.masked_fill(z < kth, float("-inf"))
        probs = torch.softmax(z, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p     # always keeps the first
            probs = torch.zeros_like(probs).index_put_((order[keep],), sorted_p[keep])
        out.append(int(torch.multinomial(probs, 1, generator=s.generator)))
    return out

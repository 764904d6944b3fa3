"""Segmented task heads: each segment of rows goes through its own task's head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


@dataclass(frozen=True, slots=True)
class HeadSegment:
    """Rows [start, end) use this head. Linear: w1 (L, H), b1 (L,), w2 = b2 = None.
    MLP: w1 (D, H), b1 (D,), w2 (L, D), b2 (L,), activation one of ACTIVATIONS."""
    start: int
    end: int
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    activation: str = "relu"


def segmented_head(x: torch.Tensor, segments: list[HeadSegment]) -> list[torch.Tensor]:
    """Semantics: out_s = x[s] @ w1.T + b1 (linear), or act(x[s] @ w1.T + b1) @ w2.T + b2 (MLP),
    for each segment s in order.

    Shapes: x (T, H); returns one (end - start, L_s) tensor per segment (label counts differ between
    tasks, so outputs are not stacked). Invariants: x is not modified; segments may not overlap.
    """
    outs = []
    for seg in segments:
        h = F.linear(x[seg.start:seg.end], seg.w1, seg.b1)
        if seg.w2 is not None:
            h = F.linear(ACTIVATIONS[seg.activation](h), seg.w2, seg.b2)
        outs.append(h)
    return outs

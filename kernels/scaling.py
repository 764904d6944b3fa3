"""Segmented per-feature scaling (IA3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ScaleSegment:
    """Rows [start, end) are multiplied feature-wise by `vector` (shape (features,))."""
    start: int
    end: int
    vector: torch.Tensor


def segmented_scale(x: torch.Tensor, segments: list[ScaleSegment]) -> torch.Tensor:
    """Semantics: out[i] = x[i] * v[s(i)] for rows in a segment, out[i] = x[i] otherwise.

    Shapes: x (T, F), v (F,). Invariants: x is not modified (a copy is made only when there is at
    least one segment); segments are disjoint.
    """
    if not segments:
        return x
    out = x.clone()
    for seg in segments:
        out[seg.start:seg.end] *= seg.vector
    return out


def segmented_scale_(x: torch.Tensor, segments: list[ScaleSegment]) -> torch.Tensor:
    """In-place variant of segmented_scale, for tensors the caller owns."""
    for seg in segments:
        x[seg.start:seg.end] *= seg.vector
    return x

"""Segmented multi-LoRA (SGMV form): many adapters applied to one packed batch in one call."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class LoraSegment:
    """Rows [start, end) use adapter (A, B, scale). A: (r, in), B: (out, r) -- PEFT's layout."""
    start: int
    end: int
    A: torch.Tensor
    B: torch.Tensor
    scale: float


def segmented_lora(y: torch.Tensor, x: torch.Tensor, segments: list[LoraSegment]) -> torch.Tensor:
    """Semantics: y[i] += scale[s(i)] * (x[i] @ A[s(i)].T) @ B[s(i)].T for every row i of a segment.

    Shapes: x (T, in), y (T, out); per segment A (r_s, in), B (out, r_s); ranks may differ.
    Invariants: segments are disjoint and within [0, T); rows in no segment are left unchanged;
    y is updated in place and returned. The shrink (x @ A.T, r_s << in) runs first so each
    segment costs 2 * rows * r_s * (in + out) flops, never a dense (in, out) delta.
    """
    for seg in segments:
        if seg.end > seg.start:
            xs = x[seg.start:seg.end]
            y[seg.start:seg.end].addmm_(xs @ seg.A.t(), seg.B.t(), alpha=seg.scale)
    return y


def lora_loop_reference(y: torch.Tensor, x: torch.Tensor, segments: list[LoraSegment]) -> torch.Tensor:
    """The same result through a dense per-adapter delta (W_s = scale * B @ A): for tests only."""
    out = y.clone()
    for seg in segments:
        delta = seg.scale * (seg.B.double() @ seg.A.double())
        out[seg.start:seg.end] += (x[seg.start:seg.end].double() @ delta.t()).to(y.dtype)
    return out


def gathered_lora(y: torch.Tensor, x: torch.Tensor, adapter: torch.Tensor, A: torch.Tensor,
                  B: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The one-row-per-request (decode, BGMV) form.

    Semantics: y[i] += scales[a] * (x[i] @ A[a, :r_a].T) @ B[a, :, :r_a].T with a = adapter[i];
    rows with adapter[i] < 0 are left unchanged.

    Shapes: x (n, in), y (n, out), adapter (n,) int; A (n_adapters, r_max, in) and
    B (n_adapters, out, r_max) stacked and padded past each adapter's rank r_a = ranks[a];
    scales (n_adapters,). Invariants: y is updated in place and returned; the shrink's outputs
    beyond r_a are masked to zero, so padding only needs to be finite (not zero).
    """
    rows = torch.nonzero(adapter >= 0).flatten()
    if rows.numel() == 0:
        return y
    a = adapter[rows]
    r_max = A.shape[1]
    mask = (torch.arange(r_max, device=x.device)[None, :] < ranks[a][:, None]).to(x.dtype)
    v = torch.bmm(A[a], x[rows].unsqueeze(2)).squeeze(2) * mask          # (m, r_max)
    delta = torch.bmm(B[a], v.unsqueeze(2)).squeeze(2)                    # (m, out)
    y.index_add_(0, rows, delta * scales[a].to(x.dtype)[:, None])
    return y

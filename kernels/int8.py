"""Weight-only int8 linear layers with per-output-channel scales (the decoder's "int8" dtype).

Quantization (symmetric, per row of a (out, in) weight W):
    scale[o] = max_i |W[o, i]| / 127          (1 where a row is all zeros)
    Q[o, i]  = round(W[o, i] / scale[o])  clamped to [-127, 127], int8
so W ~ scale[:, None] * Q with an error of at most scale[o] / 2 per element.

Compute stays in the activations' dtype: y = (x @ Q.T) * scale (the scale is applied to the
output, never folded into a float copy of the weight). A row lookup (token embeddings stored the
same way) is Q[ids] * scale[ids].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (Q int8 (out, in), scale float32 (out,)), as the module docstring says."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = (x @ Q.T) * scale. Shapes: x (T, in) float32 / bfloat16, q (out, in) int8, scale (out,)
    float32; y (T, out) in x's dtype.

    Q is widened to x's dtype for one GEMM (a temporary of one matrix) and the product scaled per
    output column. On the 2-core CI CPU ATen's weight-only kernel (torch._weight_int8pack_mm, what
    torchao's int8 weight-only mode calls) measured about 10x slower than a float32 GEMV of the
    same 1536 x 576 matrix, this form 1.8x slower per matrix; over a whole SmolLM2 decode step it
    is faster than float32 (python -m bench.generate: a quarter of the weight bytes read).
    """
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def int8_rows(ids: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` of the dequantized matrix: Q[ids] * scale[ids] (an int8 embedding lookup)."""
    return q[ids].to(dtype) * scale[ids].to(dtype)[:, None]

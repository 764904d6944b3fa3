"""CUDA versions of the segmented operations (CuPy RawKernels over torch CUDA tensors).

Same semantics as the torch implementations in kernels/lora.py and kernels/heads.py; the kernels
are in kernels/cuda/multi_lora.cu (fp32 accumulation for fp32, fp16 and bf16 storage). Imported
only where a GPU is used: CuPy is an optional dependency (the `cuda` extra).
"""
from __future__ import annotations

import functools
import os

import torch

from kernels.heads import HeadSegment
from kernels.lora import LoraSegment

SOURCE = os.path.join(os.path.dirname(__file__), "cuda", "multi_lora.cu")
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
ACT = {None: 0, "relu": 1, "gelu": 2, "tanh": 3}
RMAX, THREADS = 64, 256


@functools.cache
def _module():
    import cupy
    with open(SOURCE) as f:
        return cupy.RawModule(code=f.read(), options=("-std=c++17",))


def _launch(name: str, grid: tuple, args: tuple) -> None:
    """Launch on torch's current stream; torch tensors become CuPy views (no copy)."""
    import cupy
    args = tuple(cupy.asarray(a) if isinstance(a, torch.Tensor) else a for a in args)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    with stream:
        _module().get_function(name)(grid, (THREADS,), args)


def _ints(values, dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _ptr(t: torch.Tensor):
    import numpy as np
    return np.uint64(t.data_ptr())


def segmented_lora_cuda(y: torch.Tensor, x: torch.Tensor, segments: list[LoraSegment]) -> torch.Tensor:
    """Semantics: y[i] += scale[s(i)] * (x[i] @ A[s(i)].T) @ B[s(i)].T for every row i of a segment
    (kernels.lora.segmented_lora), as a shrink kernel into an fp32 (T, r_max) buffer followed by
    an expand kernel.

    Shapes: x (T, in), y (T, out) contiguous CUDA tensors of one dtype (fp32/fp16/bf16); per
    segment A (r_s, in), B (out, r_s) contiguous, same dtype, r_s <= 64. Invariants: segments are
    disjoint; rows outside every segment are untouched; y is updated in place and returned.
    """
    segs = [s for s in segments if s.end > s.start]
    if not segs:
        return y
    dev, suffix = x.device, SUFFIX[x.dtype]
    if max(s.A.shape[0] for s in segs) > RMAX:
        raise ValueError(f"rank above {RMAX} is not supported by the CUDA kernels")
    r_max = max(s.A.shape[0] for s in segs)
    starts = _ints([s.start for s in segs], torch.int32, dev)
    ends = _ints([s.end for s in segs], torch.int32, dev)
    ranks = _ints([s.A.shape[0] for s in segs], torch.int32, dev)
    a_ptrs = _ints([s.A.data_ptr() for s in segs], torch.int64, dev)
    b_ptrs = _ints([s.B.data_ptr() for s in segs], torch.int64, dev)
    scales = _ints([float(s.scale) for s in segs], torch.float32, dev)
    v = torch.empty(x.shape[0], r_max, dtype=torch.float32, device=dev)
    longest = max(s.end - s.start for s in segs)
    warps = THREADS // 32
    _launch(f"sgmv_shrink_{suffix}", (len(segs), -(-longest // warps)),
            (_ptr(x), _ptr(v), starts, ends, a_ptrs, ranks, x.shape[1], r_max))
    rows_per_block = 16
    _launch(f"sgmv_expand_{suffix}", (len(segs), -(-longest // rows_per_block),
                                      -(-y.shape[1] // THREADS)),
            (_ptr(y), _ptr(v), starts, ends, b_ptrs, ranks, scales, y.shape[1], r_max,
             rows_per_block))
    return y


def segmented_head_cuda(x: torch.Tensor, segments: list[HeadSegment]) -> list[torch.Tensor]:
    """Semantics of kernels.heads.segmented_head: out_s = x[s] @ w1.T + b1, or
    act(x[s] @ w1.T + b1) @ w2.T + b2 (MLP), one launch per layer for all segments.

    Shapes: x (T, H) contiguous CUDA; per segment weights contiguous, same dtype. Returns one
    (rows_s, L_s) tensor per segment (views of one packed buffer). Every element is written.
    """
    if not segments:
        return []
    first = _layer(x, segments, [(s.w1, s.b1) for s in segments],
                   [s.activation if s.w2 is not None else None for s in segments])
    if all(s.w2 is None for s in segments):
        return first
    # Second layer of MLP heads: its input is each segment's hidden output, packed back to back.
    mlp = [k for k, s in enumerate(segments) if s.w2 is not None]
    hidden = torch.cat([first[k] for k in mlp])
    starts, at = [], 0
    for k in mlp:
        starts.append(at)
        at += first[k].shape[0]
    second_segs = [HeadSegment(st, st + first[k].shape[0], segments[k].w2, segments[k].b2)
                   for st, k in zip(starts, mlp)]
    second = _layer(hidden, second_segs, [(s.w1, s.b1) for s in second_segs], [None] * len(mlp))
    out = list(first)
    for k, res in zip(mlp, second):
        out[k] = res
    return out


def _layer(x, segments, weights, acts) -> list[torch.Tensor]:
    if len(set(acts)) > 1:                       # one activation per launch
        groups: dict = {}
        for k, a in enumerate(acts):
            groups.setdefault(a, []).append(k)
        out = [None] * len(segments)
        for a, ks in groups.items():
            for k, res in zip(ks, _layer(x, [segments[k] for k in ks], [weights[k] for k in ks],
                                         [a] * len(ks))):
                out[k] = res
        return out
    dev, suffix = x.device, SUFFIX[x.dtype]
    n_out = [w.shape[0] for w, _ in weights]
    rows = [s.end - s.start for s in segments]
    offsets, total = [], 0
    for r, n in zip(rows, n_out):
        offsets.append(total)
        total += r * n
    out = torch.empty(total, dtype=x.dtype, device=dev)
    _launch(f"segmented_head_{suffix}", (len(segments), -(-max(r * n for r, n in zip(rows, n_out))
                                                           // THREADS)),
            (_ptr(x), _ptr(out), _ints([s.start for s in segments], torch.int32, dev),
             _ints([s.end for s in segments], torch.int32, dev),
             _ints([w.data_ptr() for w, _ in weights], torch.int64, dev),
             _ints([b.data_ptr() for _, b in weights], torch.int64, dev),
             _ints(n_out, torch.int32, dev), _ints(offsets, torch.int64, dev),
             x.shape[1], ACT[acts[0]]))
    return [out[o:o + r * n].view(r, n) for o, r, n in zip(offsets, rows, n_out)]

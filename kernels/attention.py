"""Variable-length self-attention over a packed batch, without padding every row to the longest.

Sequences of a packed batch (rows [start, start + length) each) are grouped into length buckets;
each bucket is gathered into a (b, L_bucket) block, run through one scaled_dot_product_attention
call with a key-padding mask, and scattered back. Padding is bounded per bucket by `slack`
(padded slots <= (1 + slack) * real tokens, or the bucket holds one sequence), so the waste stays
small however the lengths mix, and the number of attention calls stays small.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class Bucket:
    index: torch.Tensor        # (b, L) rows of the packed batch to gather (padding repeats a row)
    mask: torch.Tensor | None  # (b, 1, 1, L) True where the key is real; None if no padding
    valid: torch.Tensor        # (b * L,) True where the slot is a real token
    rows: torch.Tensor         # (n_real,) packed rows the valid slots scatter back to


@dataclass(frozen=True, slots=True)
class VarlenPlan:
    total: int
    buckets: list[Bucket]


def plan_varlen(starts: list[int], lengths: list[int], slack: float = 0.25) -> VarlenPlan:
    """Group sequences into buckets. starts/lengths describe each sequence's rows in the packed
    batch (lengths >= 1). The plan depends only on the lengths, so it is built once per batch and
    reused by every layer."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups:
            cap = lengths[groups[-1][0]]
            if (len(groups[-1]) + 1) * cap <= (1 + slack) * (real + lengths[i]):
                groups[-1].append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    buckets = [_bucket([starts[i] for i in g], [lengths[i] for i in g]) for g in groups]
    return VarlenPlan(total=sum(lengths), buckets=buckets)


def _bucket(starts: list[int], lengths: list[int]) -> Bucket:
    st = torch.tensor(starts, dtype=torch.long)[:, None]
    ln = torch.tensor(lengths, dtype=torch.long)[:, None]
    width = int(ln.max())
    pos = torch.arange(width, dtype=torch.long)[None, :]
    real = pos < ln                                   # (b, L)
    index = st + torch.minimum(pos, ln - 1)           # padding repeats the last real row
    padded = not bool(real.all())
    return Bucket(index=index, mask=real[:, None, None, :] if padded else None,
                  valid=real.reshape(-1), rows=index[real])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan,
                     heads: int) -> torch.Tensor:
    """Semantics: for each sequence s (rows R_s) and head h,
        out[R_s, h] = softmax(q[R_s, h] @ k[R_s, h].T / sqrt(d)) @ v[R_s, h]
    with no attention across sequences.

    Shapes: q, k, v (T, heads * d) packed; returns (T, heads * d). Invariants: every row of the
    output belongs to exactly one sequence and is written exactly once; T == plan.total.
    """
    total, width = q.shape
    d = width // heads
    out = torch.empty_like(q)
    for b in plan.buckets:
        n, L = b.index.shape

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t[b.index].view(n, L, heads, d).transpose(1, 2)

        o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), attn_mask=b.mask)
        o = o.transpose(1, 2).reshape(n * L, width)
        out[b.rows] = o[b.valid]
    return out

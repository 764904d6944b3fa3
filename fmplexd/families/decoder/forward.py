"""The decoder family's forward: one Llama iteration over a packed batch of many sequences' rows.

Rows: every running sequence's next token (decode) and chunks of prompts being prefilled, packed
back to back with each task's rows contiguous (so its LoRA / IA3 apply as one segment). Shapes:
T rows, H hidden, h heads, g key/value heads (h % g == 0), d head dim, V vocabulary.

    x = embed(ids)                                                       (T, H)
    per layer:  a = rmsnorm(x);  q, k, v = a Wq, a Wk, a Wv (+ extensions) (T, h*d), (T, g*d) x 2
                q, k = rope(q, k, position);  KV pool[slots of the rows] = k, v
                o = attention(q over each row's own sequence: its cached prefix and itself, causal)
                x = x + o Wo;   a = rmsnorm(x);   x = x + (silu(a Wgate) * (a Wup)) Wdown
    logits = rmsnorm(x[sample rows]) W_lm                                (S, V)

RoPE is Hugging Face's rotate_half form: inv_freq = theta^(-2i/d), angle = position * inv_freq,
q' = q cos + rotate_half(q) sin. Attention: decode rows of all sequences in one call over their
contexts gathered from the pool and padded to the longest (a key mask hides the padding); each
prefill chunk in its own call with a causal mask offset by its start. Everything is computed in
the weights' dtype (float32 for int8 weights: each matrix product is kernels.int8.int8_linear and
the embedding a scaled row lookup); the KV pool holds keys after RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fmplexd.families.decoder.kv import KVPool
from fmplexd.families.decoder.loader import SCALE_SUFFIX, TARGETS, DecoderConfig
from fmplexd.families.extensions import ModuleExt, extended_linear
from kernels.int8 import int8_linear, int8_rows


@dataclass(slots=True)
class SeqRows:
    """One sequence's rows: rows [row, row + n) hold its positions [start, start + n); it attends
    to its positions [0, start + n), whose pool slots are `ctx_slots`."""
    row: int
    n: int
    start: int
    ctx_slots: torch.Tensor


@dataclass(slots=True)
class Iteration:
    ids: torch.Tensor                      # (T,) long
    positions: torch.Tensor                # (T,) long
    slots: torch.Tensor                    # (T,) long: where each row's k, v are stored
    parts: list[SeqRows]                   # every sequence of the iteration
    sample_rows: torch.Tensor              # (S,) rows whose next-token logits are needed
    ext: dict[tuple[int, str], ModuleExt] = field(default_factory=dict)


@dataclass(slots=True)
class _Plan:
    """Attention gathers, built once per iteration and used by every layer."""
    decode_rows: torch.Tensor | None       # (B,) rows of one-token parts
    decode_ctx: torch.Tensor | None        # (B, L) pool slots (padding repeats a valid slot)
    decode_mask: torch.Tensor | None       # (B, 1, 1, L) True where a key is real
    chunks: list[tuple[SeqRows, torch.Tensor]]   # multi-row parts with their (n, L) causal mask


class DecoderForward:
    """Runs on weights it does not own (read-only views of the backbone region)."""

    def __init__(self, cfg: DecoderConfig, weights: dict[str, torch.Tensor]):
        self.cfg, self.w = cfg, weights
        d = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64)
                                                  .float() / d))
        head = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
        self.embed = weights["model.embed_tokens.weight"]
        self.embed_scale = weights.get("model.embed_tokens.weight" + SCALE_SUFFIX)
        self.lm_head, self.head_base = self._base_linear(head)
        self.int8 = self.embed.dtype == torch.int8      # the "int8" dtype: see kernels.int8
        self.dtype = torch.float32 if self.int8 else self.embed.dtype
        self.base = {(i, t): self._base_linear(f"model.layers.{i}.{path}.weight")
                     for i in range(cfg.layers) for t, path in TARGETS.items()}

    @torch.inference_mode()
    def __call__(self, it: Iteration, pool: KVPool) -> torch.Tensor:
        """(S, V) float32 logits of the sample rows; stores every row's k, v in the pool."""
        cfg, w = self.cfg, self.w
        plan = self._plan(it)
        cos, sin = self._rope(it.positions)
        x = self._embed(it.ids)                                               # (T, H)
        for i in range(cfg.layers):
            p = f"model.layers.{i}."
            a = self.rmsnorm(x, w[p + "input_layernorm.weight"])
            q = self.linear(a, i, "q_proj", it)                               # (T, h*d)
            k = self.linear(a, i, "k_proj", it)                               # (T, g*d)
            v = self.linear(a, i, "v_proj", it)
            q = _rotate(q.view(-1, cfg.heads, cfg.head_dim), cos, sin)
            k = _rotate(k.view(-1, cfg.kv_heads, cfg.head_dim), cos, sin)
            pool.write(i, it.slots, k, v.view(-1, cfg.kv_heads, cfg.head_dim))
            o = self.attention(q, pool, i, plan)                              # (T, h*d)
            x = x + self.linear(o, i, "o_proj", it, owned=True)
            a = self.rmsnorm(x, w[p + "post_attention_layernorm.weight"])
            g = F.silu(self.linear(a, i, "gate_proj", it)) * self.linear(a, i, "up_proj", it)
            x = x + self.linear(g, i, "down_proj", it, owned=True)
        h = self.rmsnorm(x[it.sample_rows], w["model.norm.weight"])
        base = self.head_base
        return (base(h) if base is not None else F.linear(h, self.lm_head)).float()

    def linear(self, x: torch.Tensor, layer: int, target: str, it: Iteration,
               owned: bool = False) -> torch.Tensor:
        weight, base = self.base[(layer, target)]
        return extended_linear(x, weight, None, it.ext.get((layer, target)), owned, base)

    def _base_linear(self, key: str):
        """(weight, None) for F.linear, or for an int8 matrix (weight, x -> int8_linear(x))."""
        weight = self.w[key]
        if weight.dtype != torch.int8:
            return weight, None
        scale = self.w[key + SCALE_SUFFIX]
        return weight, lambda x: int8_linear(x, weight, scale)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return int8_rows(ids, self.embed, self.embed_scale)
        return F.embedding(ids, self.embed)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """weight * x / sqrt(mean(x^2) + eps), computed in float32 as Hugging Face's LlamaRMSNorm."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        return weight * xf.to(x.dtype)

    def attention(self, q: torch.Tensor, pool: KVPool, layer: int, plan: _Plan) -> torch.Tensor:
        """(T, h, d) queries -> (T, h*d): each row attends to its own sequence's keys."""
        cfg = self.cfg
        out = torch.empty(q.shape[0], cfg.heads * cfg.head_dim, dtype=q.dtype)
        kp, vp = pool.k[layer], pool.v[layer]
        if plan.decode_rows is not None:
            b, length = plan.decode_ctx.shape
            kk = kp[plan.decode_ctx].transpose(1, 2)                          # (B, g, L, d)
            vv = vp[plan.decode_ctx].transpose(1, 2)
            qq = q[plan.decode_rows].unsqueeze(2)                             # (B, h, 1, d)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=plan.decode_mask,
                                               enable_gqa=cfg.heads != cfg.kv_heads)
            out[plan.decode_rows] = o.reshape(b, -1)
        for part, mask in plan.chunks:
            kk = kp[part.ctx_slots].transpose(0, 1).unsqueeze(0)               # (1, g, L, d)
            vv = vp[part.ctx_slots].transpose(0, 1).unsqueeze(0)
            qq = q[part.row:part.row + part.n].transpose(0, 1).unsqueeze(0)     # (1, h, n, d)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask,
                                               enable_gqa=cfg.heads != cfg.kv_heads)
            out[part.row:part.row + part.n] = o[0].transpose(0, 1).reshape(part.n, -1)
        return out

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = positions.float()[:, None] * self.inv_freq[None, :]              # (T, d/2)
        emb = torch.cat((angle, angle), dim=-1)
        dtype = self.dtype
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    @staticmethod
    def _plan(it: Iteration) -> _Plan:
        single = [p for p in it.parts if p.n == 1]
        chunks = []
        for p in it.parts:
            if p.n > 1:
                keys = torch.arange(p.start + p.n)
                chunks.append((p, keys[None, :] <= (p.start + torch.arange(p.n))[:, None]))
        if not single:
            return _Plan(None, None, None, chunks)
        length = max(len(p.ctx_slots) for p in single)
        ctx = torch.empty(len(single), length, dtype=torch.long)
        mask = torch.zeros(len(single), length, dtype=torch.bool)
        for j, p in enumerate(single):
            n = len(p.ctx_slots)
            ctx[j, :n] = p.ctx_slots
            ctx[j, n:] = p.ctx_slots[0]
            mask[j, :n] = True
        rows = torch.tensor([p.row for p in single], dtype=torch.long)
        return _Plan(rows, ctx, mask[:, None, None, :], chunks)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, d): x cos + rotate_half(x) sin, rotate_half(x) = cat(-x2, x1)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

"""The text-encoder family's forward (BERT, RoBERTa, MiniLM) over a packed multi-task batch, with per-segment extensions.

Short and flat on purpose: embed -> layers -> hidden states. Shapes: T = total rows of the packed
batch (every sequence's virtual prompt rows + real token rows, sequences back to back), H = hidden.

Per module the extension order is: IA3 input scaling (feedforward IA3) -> base linear (+ bias) ->
+ LoRA (computed on the same scaled input) -> IA3 output scaling. This matches PEFT, where one task
carries one adapter type.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fmplexd.families.encoder.loader import TARGETS, EncoderConfig
from fmplexd.families.extensions import ModuleExt, extended_linear
from kernels.attention import VarlenPlan, varlen_attention

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(slots=True)
class PackedInput:
    """A packed batch ready for the encoder.

    ids/type_ids/positions: (T,) long. prompt_rows: (P,) rows that hold virtual tokens, filled from
    prompt_values (P, H) instead of the word embedding. plan: attention buckets of the sequences.
    ext[(layer, target)]: the batch's extensions of that linear layer (absent = none).
    """
    ids: torch.Tensor
    type_ids: torch.Tensor
    positions: torch.Tensor
    plan: VarlenPlan
    prompt_rows: torch.Tensor | None = None
    prompt_values: torch.Tensor | None = None
    ext: dict[tuple[int, str], ModuleExt] = field(default_factory=dict)


class Encoder:
    """Runs the forward on weights it does not own (read-only views of the backbone region)."""

    def __init__(self, cfg: EncoderConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.w = weights
        self.act = ACTIVATIONS[cfg.activation]

    def embed(self, batch: PackedInput) -> torch.Tensor:
        w = self.w
        x = F.embedding(batch.ids, w["embeddings.word_embeddings.weight"])       # (T, H)
        if batch.prompt_rows is not None:
            x[batch.prompt_rows] = batch.prompt_values.to(x.dtype)
        x = x + F.embedding(batch.positions, w["embeddings.position_embeddings.weight"])
        x = x + F.embedding(batch.type_ids, w["embeddings.token_type_embeddings.weight"])
        return F.layer_norm(x, (self.cfg.hidden,), w["embeddings.LayerNorm.weight"],
                            w["embeddings.LayerNorm.bias"], self.cfg.eps)

    def linear(self, x: torch.Tensor, layer: int, target: str, batch: PackedInput,
               owned: bool = False) -> torch.Tensor:
        """One (extended) linear layer (`target` as in loader.TARGETS). `owned`: x is a temporary
        of this layer only, so input scaling may happen in place instead of copying the (T, in)
        tensor."""
        name = f"encoder.layer.{layer}.{TARGETS[target]}"
        return extended_linear(x, self.w[name + ".weight"], self.w[name + ".bias"],
                               batch.ext.get((layer, target)), owned)

    def layer(self, i: int, x: torch.Tensor, batch: PackedInput) -> torch.Tensor:
        w, cfg = self.w, self.cfg
        p = f"encoder.layer.{i}."
        q = self.linear(x, i, "query", batch)                               # (T, H)
        k = self.linear(x, i, "key", batch)
        v = self.linear(x, i, "value", batch)
        ctx = varlen_attention(q, k, v, batch.plan, cfg.heads)                    # (T, H)
        a = self.linear(ctx, i, "attn_out", batch, owned=True)
        x = F.layer_norm(a + x, (cfg.hidden,), w[p + "attention.output.LayerNorm.weight"],
                         w[p + "attention.output.LayerNorm.bias"], cfg.eps)
        h = self.act(self.linear(x, i, "ffn_in", batch))                    # (T, I)
        o = self.linear(h, i, "ffn_out", batch, owned=True)                  # (T, H)
        return F.layer_norm(o + x, (cfg.hidden,), w[p + "output.LayerNorm.weight"],
                            w[p + "output.LayerNorm.bias"], cfg.eps)

    def forward(self, batch: PackedInput) -> torch.Tensor:
        """(T, H) final hidden states of every row, virtual rows included."""
        x = self.embed(batch)
        for i in range(self.cfg.layers):
            x = self.layer(i, x, batch)
        return x

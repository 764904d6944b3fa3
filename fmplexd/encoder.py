"""The BERT-family encoder forward over a packed multi-task batch, with per-segment extensions.

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

from fmplexd.backbone import EncoderConfig
from ipc.messages import Module
from kernels.attention import VarlenPlan, varlen_attention
from kernels.lora import LoraSegment, segmented_lora
from kernels.scaling import ScaleSegment, segmented_scale, segmented_scale_

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}

HF_MODULES = {
    Module.QUERY: "attention.self.query", Module.KEY: "attention.self.key",
    Module.VALUE: "attention.self.value", Module.ATTN_OUT: "attention.output.dense",
    Module.FFN_IN: "intermediate.dense", Module.FFN_OUT: "output.dense",
}


@dataclass(slots=True)
class ModuleExt:
    """Everything the tasks of one batch add to one linear layer."""
    lora: list[LoraSegment] = field(default_factory=list)
    scale_in: list[ScaleSegment] = field(default_factory=list)
    scale_out: list[ScaleSegment] = field(default_factory=list)


@dataclass(slots=True)
class PackedInput:
    """A packed batch ready for the encoder.

    ids/type_ids/positions: (T,) long. prompt_rows: (P,) rows that hold virtual tokens, filled from
    prompt_values (P, H) instead of the word embedding. plan: attention buckets of the sequences.
    ext[(layer, module)]: the batch's extensions of that linear layer (absent = none).
    """
    ids: torch.Tensor
    type_ids: torch.Tensor
    positions: torch.Tensor
    plan: VarlenPlan
    prompt_rows: torch.Tensor | None = None
    prompt_values: torch.Tensor | None = None
    ext: dict[tuple[int, Module], ModuleExt] = field(default_factory=dict)


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

    def linear(self, x: torch.Tensor, layer: int, module: Module, batch: PackedInput,
               owned: bool = False) -> torch.Tensor:
        """One (extended) linear layer. `owned`: x is a temporary of this layer only, so input
        scaling may happen in place instead of copying the whole (T, in) tensor."""
        name = f"encoder.layer.{layer}.{HF_MODULES[module]}"
        ext = batch.ext.get((layer, module))
        if ext is None:
            return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])
        x = (segmented_scale_ if owned else segmented_scale)(x, ext.scale_in)
        y = F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])
        segmented_lora(y, x, ext.lora)
        return segmented_scale_(y, ext.scale_out)

    def layer(self, i: int, x: torch.Tensor, batch: PackedInput) -> torch.Tensor:
        w, cfg = self.w, self.cfg
        p = f"encoder.layer.{i}."
        q = self.linear(x, i, Module.QUERY, batch)                               # (T, H)
        k = self.linear(x, i, Module.KEY, batch)
        v = self.linear(x, i, Module.VALUE, batch)
        ctx = varlen_attention(q, k, v, batch.plan, cfg.heads)                    # (T, H)
        a = self.linear(ctx, i, Module.ATTN_OUT, batch, owned=True)
        x = F.layer_norm(a + x, (cfg.hidden,), w[p + "attention.output.LayerNorm.weight"],
                         w[p + "attention.output.LayerNorm.bias"], cfg.eps)
        h = self.act(self.linear(x, i, Module.FFN_IN, batch))                    # (T, I)
        o = self.linear(h, i, Module.FFN_OUT, batch, owned=True)                  # (T, H)
        return F.layer_norm(o + x, (cfg.hidden,), w[p + "output.LayerNorm.weight"],
                            w[p + "output.LayerNorm.bias"], cfg.eps)

    def forward(self, batch: PackedInput) -> torch.Tensor:
        """(T, H) final hidden states of every row, virtual rows included."""
        x = self.embed(batch)
        for i in range(self.cfg.layers):
            x = self.layer(i, x, batch)
        return x

"""Train the demo's generation adapter honestly, in well under a minute on a CPU: a LoRA on the top
layers of SmolLM2 that makes the assistant answer like a pirate ("Arr, matey! ..."), from the
bundled question/answer pairs (data.json, "pirate").

Only the top `layers` carry the LoRA, so the frozen layers below run once (no grad); each step runs
the top layers, the final norm and the (tied) LM head on the assistant's tokens only, with the
cross-entropy of the target answers. The forward is the daemon's math (fmplexd's DecoderForward
pieces: RMSNorm, rotate_half RoPE, grouped-query attention, SwiGLU) over whole sequences. The
adapter is written exactly as PEFT saves one, so the task process loads it like any other. The
backbone may be loaded in any dtype the daemon serves a decoder in (float32, float16, bfloat16,
int8): its frozen matrices are applied as the daemon applies them, the LoRA trains in float32.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmplex.demo.train import load_data
from fmplexd.families.decoder.forward import DecoderForward, _rotate
from fmplexd.families.decoder.loader import TARGETS


@dataclass(frozen=True, slots=True)
class GenRecipe:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")
    layers: int = 3                  # the top layers that carry the LoRA
    steps: int = 20
    lr: float = 2e-3


@dataclass(frozen=True, slots=True)
class GenTrained:
    adapter_dir: str
    loss_first: float
    loss_last: float
    seconds: float
    examples: int


def chat_text(template, system: str | None, question: str) -> str:
    chat = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": question}]
    return template.render(messages=chat, add_generation_prompt=True)


def train_pirate(backbone, tokenizer, out_dir: str, recipe: GenRecipe = GenRecipe(),
                 seed: int = 0) -> GenTrained:
    """backbone: a loaded decoder Backbone (its read-only weights); tokenizer: its Tokenizer."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    torch.manual_seed(seed)
    data = load_data("pirate")
    cfg, fw = backbone.config, DecoderForward(backbone.config, backbone.weights)
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        backbone.info.generation.chat_template)
    prompts, targets = [], []
    for q, a in zip(data["questions"], data["answers"]):
        prompts.append(tokenizer.encode(chat_text(template, None, q), add_special_tokens=False).ids)
        targets.append(tokenizer.encode(data["prefix"] + a + "<|im_end|>",
                                        add_special_tokens=False).ids)
    seqs = [p + t for p, t in zip(prompts, targets)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])              # (B, L)
    valid = torch.tensor([[i < len(s) for i in range(width)] for s in seqs])    # real tokens
    loss_at = torch.zeros_like(valid)                    # positions predicting an answer token
    for b, (p, t) in enumerate(zip(prompts, targets)):
        loss_at[b, len(p) - 1:len(p) + len(t) - 1] = True
    labels = torch.roll(ids, -1, dims=1)
    first = cfg.layers - recipe.layers
    lora = {(layer, name): _init(cfg, name, recipe.rank) for layer in range(first, cfg.layers)
            for name in recipe.targets}
    params = [p for ab in lora.values() for p in ab]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    with torch.no_grad():
        x0 = fw._embed(ids.flatten()).view(*ids.shape, -1).float()
        for layer in range(first):
            x0 = _layer(fw, layer, x0, valid, {}, 0.0)
    scale = recipe.alpha / recipe.rank
    losses = []
    for _ in range(recipe.steps):
        x = x0
        for layer in range(first, cfg.layers):
            x = _layer(fw, layer, x, valid, lora, scale)
        h = fw.rmsnorm(x[loss_at], backbone.weights["model.norm.weight"])
        loss = F.cross_entropy(_frozen(h, fw.lm_head, fw.head_base), labels[loss_at])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    adapter = os.path.join(out_dir, "pirate-lora")
    _save_peft(adapter, lora, recipe, first, cfg.layers)
    return GenTrained(adapter, losses[0], losses[-1], time.perf_counter() - t0, len(seqs))


def _init(cfg, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    from fmplexd.families.decoder.loader import target_dims
    fan_in, fan_out = target_dims(cfg)[name]
    A = (torch.randn(rank, fan_in) / fan_in ** 0.5).requires_grad_()
    B = torch.zeros(fan_out, rank, requires_grad=True)                  # PEFT's init: B = 0
    return A, B


def _layer(fw: DecoderForward, layer: int, x: torch.Tensor, valid: torch.Tensor, lora: dict,
           scale: float) -> torch.Tensor:
    """One decoder layer over padded whole sequences (B, L, H), causal, padding masked."""
    cfg, w = fw.cfg, fw.w
    p = f"model.layers.{layer}."
    b, length, _ = x.shape

    def lin(inp, name):
        y = _frozen(inp, *fw.base[(layer, name)])
        ab = lora.get((layer, name))
        if ab is not None:
            y = y + scale * (inp @ ab[0].t()) @ ab[1].t()
        return y

    a = fw.rmsnorm(x, w[p + "input_layernorm.weight"])
    cos, sin = fw._rope(torch.arange(length))
    q = _rotate(lin(a, "q_proj").view(b * length, cfg.heads, cfg.head_dim), cos.repeat(b, 1, 1),
                sin.repeat(b, 1, 1)).view(b, length, cfg.heads, cfg.head_dim).transpose(1, 2)
    k = _rotate(lin(a, "k_proj").view(b * length, cfg.kv_heads, cfg.head_dim),
                cos.repeat(b, 1, 1), sin.repeat(b, 1, 1)
                ).view(b, length, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
    v = lin(a, "v_proj").view(b, length, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None] & \
        valid[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    x = x + lin(o.transpose(1, 2).reshape(b, length, -1), "o_proj")
    a = fw.rmsnorm(x, w[p + "post_attention_layernorm.weight"])
    return x + lin(F.silu(lin(a, "gate_proj")) * lin(a, "up_proj"), "down_proj")


def _frozen(x: torch.Tensor, weight: torch.Tensor, int8) -> torch.Tensor:
    """x @ W.T in float32 for a frozen backbone matrix of any dtype the daemon loads (`int8`:
    DecoderForward's int8 product, else None); training runs in float32 throughout."""
    if int8 is not None:
        return int8(x)
    return F.linear(x.to(weight.dtype), weight).float()


def _save_peft(path: str, lora: dict, recipe: GenRecipe, first: int, layers: int) -> None:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for (layer, name), (A, B) in lora.items():
        key = f"base_model.model.model.layers.{layer}.{TARGETS[name]}"
        tensors[f"{key}.lora_A.weight"] = A.detach().contiguous()
        tensors[f"{key}.lora_B.weight"] = B.detach().contiguous()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": recipe.rank,
                   "lora_alpha": recipe.alpha, "lora_dropout": 0.0, "bias": "none",
                   "target_modules": list(recipe.targets), "use_rslora": False,
                   "use_dora": False, "fan_in_fan_out": False,
                   "layers_to_transform": list(range(first, layers)),
                   "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, f, indent=2)

"""Train the demo's adapters honestly, in seconds: a LoRA adapter and a classifier head, jointly,
on the bundled labeled sentences (data.json), with the same encoder code the daemon serves with.

The adapter is written exactly as PEFT saves one (adapter_config.json + adapter_model.safetensors,
keys `base_model.model.encoder.layer.N.<module>.lora_{A,B}.weight`), the head as a safetensors file
(weight/bias, or w1/b1/w2/b2). This is the demo's only torch use outside the daemon; task processes
load the results without torch.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer

from fmplexd.families.encoder.forward import Encoder, PackedInput
from fmplexd.families.extensions import ModuleExt
from fmplexd.families.encoder.loader import TARGETS, read_config, read_weights
from kernels.attention import plan_varlen
from kernels.lora import LoraSegment

DATA = os.path.join(os.path.dirname(__file__), "data.json")


@dataclass(frozen=True, slots=True)
class Recipe:
    task: str                   # key in data.json
    rank: int
    alpha: float
    modules: tuple[str, ...]           # encoder targets (fmplexd.families.encoder.loader)
    layers: tuple[int, ...] = (5,)     # LoRA on the top layer(s): the frozen rest runs once
    mlp_hidden: int = 0                # 0 = linear head
    steps: int = 15
    lr: float = 1e-2


@dataclass(frozen=True, slots=True)
class Trained:
    adapter_dir: str
    head_path: str
    labels: list[str]
    train_accuracy: float
    seconds: float
    examples: int


def load_data(task: str) -> dict:
    with open(DATA) as f:
        return json.load(f)[task]


def _pack(tok: Tokenizer, texts: list[str]) -> tuple[PackedInput, torch.Tensor, torch.Tensor]:
    encs = tok.encode_batch(texts)
    lens = [len(e.ids) for e in encs]
    ids = torch.tensor([i for e in encs for i in e.ids])
    starts = np.concatenate(([0], np.cumsum(lens)[:-1])).tolist()
    positions = torch.cat([torch.arange(n) for n in lens])
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    packed = PackedInput(ids=ids, type_ids=torch.zeros_like(ids), positions=positions,
                         plan=plan_varlen(starts, lens))
    return packed, seg, torch.tensor(lens, dtype=torch.float32)


def train(backbone_dir: str, recipe: Recipe, out_dir: str, seed: int = 0) -> Trained:
    torch.manual_seed(seed)
    data = load_data(recipe.task)
    cfg = read_config(backbone_dir)
    encoder = Encoder(cfg, read_weights(backbone_dir))
    tok = Tokenizer.from_file(os.path.join(backbone_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(cfg.max_positions)
    packed, seg, lens = _pack(tok, data["texts"])
    y = torch.tensor(data["targets"])
    n_labels, h = len(data["labels"]), cfg.hidden
    scale = recipe.alpha / recipe.rank
    lora = {}
    for layer in recipe.layers:
        for m in recipe.modules:
            fan_out, fan_in = encoder.w[f"encoder.layer.{layer}.{TARGETS[m]}.weight"].shape
            A = (torch.randn(recipe.rank, fan_in) / fan_in ** 0.5).requires_grad_()
            B = torch.zeros(fan_out, recipe.rank, requires_grad=True)      # PEFT's init: B = 0
            lora[(layer, m)] = (A, B)
    T = len(packed.ids)
    packed.ext = {k: ModuleExt(lora=[LoraSegment(0, T, A, B, scale)]) for k, (A, B) in lora.items()}
    if recipe.mlp_hidden:
        head = {"w1": torch.randn(recipe.mlp_hidden, h) * 0.05, "b1": torch.zeros(recipe.mlp_hidden),
                "w2": torch.randn(n_labels, recipe.mlp_hidden) * 0.05, "b2": torch.zeros(n_labels)}
    else:
        head = {"weight": torch.randn(n_labels, h) * 0.05, "bias": torch.zeros(n_labels)}
    for t in head.values():
        t.requires_grad_()
    params = [p for ab in lora.values() for p in ab] + list(head.values())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    first = min(recipe.layers)
    with torch.no_grad():                       # the frozen layers below the adapter, once
        frozen = encoder.embed(packed)
        for i in range(first):
            frozen = encoder.layer(i, frozen, packed)
    for _ in range(recipe.steps):
        logits = _logits(encoder, packed, seg, lens, head, frozen, first)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = (_logits(encoder, packed, seg, lens, head, frozen, first).argmax(1) == y
               ).float().mean().item()
    adapter_dir = os.path.join(out_dir, f"{recipe.task}-lora")
    head_path = os.path.join(out_dir, f"{recipe.task}-head.safetensors")
    write_peft_lora(adapter_dir, lora, recipe)
    save_file({k: v.detach().contiguous() for k, v in head.items()}, head_path)
    return Trained(adapter_dir, head_path, data["labels"], acc, seconds, len(y))


def _logits(encoder: Encoder, packed: PackedInput, seg, lens, head, hidden, first: int):
    for i in range(first, encoder.cfg.layers):
        hidden = encoder.layer(i, hidden, packed)
    pooled = torch.zeros(len(lens), hidden.shape[1]).index_add_(0, seg, hidden) / lens[:, None]
    if "w1" in head:
        return F.linear(F.relu(F.linear(pooled, head["w1"], head["b1"])), head["w2"], head["b2"])
    return F.linear(pooled, head["weight"], head["bias"])


def write_peft_lora(path: str, lora: dict, recipe: Recipe) -> None:
    """Save LoRA weights in PEFT's on-disk format (loadable by peft.PeftModel.from_pretrained)."""
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for (layer, m), (A, B) in lora.items():
        key = f"base_model.model.encoder.layer.{layer}.{TARGETS[m]}"
        tensors[f"{key}.lora_A.weight"] = A.detach().contiguous()
        tensors[f"{key}.lora_B.weight"] = B.detach().contiguous()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": recipe.rank,
        "lora_alpha": recipe.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({TARGETS[m] for m in recipe.modules}),
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": sorted(recipe.layers), "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)

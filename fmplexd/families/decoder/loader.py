"""The decoder family's loader: a Llama-style LLM from a GGUF file (quantized weights are
dequantized) or a Hugging Face directory (config.json model_type "llama" + safetensors), checked
and published in one sealed read-only region.

Weights keep Hugging Face Llama names ("model.layers.N.self_attn.q_proj.weight", ...); with tied
embeddings there is no lm_head and the LM head is model.embed_tokens. A GGUF's tokenizer is written
as tokenizer.json into `workdir` (task processes load it by path); its chat template and special
token ids travel in BackboneInfo.generation.

Targets (per layer, with PEFT's module paths; H hidden, I intermediate, d head dim):
    q_proj self_attn.q_proj (H -> heads*d)      k_proj self_attn.k_proj (H -> kv_heads*d)
    v_proj self_attn.v_proj (H -> kv_heads*d)   o_proj self_attn.o_proj (heads*d -> H)
    gate_proj mlp.gate_proj (H -> I)   up_proj mlp.up_proj (H -> I)   down_proj mlp.down_proj (I -> H)
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from fmplexd.families.base import Backbone, Progress, check_shapes, hf_model_type, publish, quiet
from ipc.messages import BackboneInfo, Family, GenerationInfo, TargetInfo
from kernels.int8 import quantize_per_channel

MODEL_TYPES = {"llama"}
SCALE_SUFFIX = "_scale"      # int8 backbones: "<matrix>.weight_scale" holds its per-row scales
TARGETS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
           "down_proj": "mlp.down_proj"}


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int       # context: prompt + completion
    eps: float
    rope_theta: float
    tied: bool               # LM head = token embeddings


def is_decoder_path(path: str) -> bool:
    """A .gguf file, or a directory whose config.json names a supported decoder model_type."""
    return (path.endswith(".gguf") and os.path.isfile(path)) or hf_model_type(path) in MODEL_TYPES


def config_from(c: dict) -> DecoderConfig:
    heads = c["num_attention_heads"]
    return DecoderConfig(
        model_type=c.get("model_type", "llama"), hidden=c["hidden_size"],
        layers=c["num_hidden_layers"], heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        intermediate=c["intermediate_size"], vocab=c["vocab_size"],
        max_positions=c.get("max_position_embeddings", 2048), eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get(
            "rope_theta", 10000.0)),
        tied=bool(c.get("tie_word_embeddings", False)))


def expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    h = cfg.hidden
    shapes = {"model.embed_tokens.weight": (cfg.vocab, h), "model.norm.weight": (h,)}
    if not cfg.tied:
        shapes["lm_head.weight"] = (cfg.vocab, h)
    dims = target_dims(cfg)
    for layer in range(cfg.layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, path in TARGETS.items():
            fan_in, fan_out = dims[name]
            shapes[f"{p}{path}.weight"] = (fan_out, fan_in)
    return shapes


def target_dims(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target."""
    h, i, q, kv = cfg.hidden, cfg.intermediate, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def load(name: str, path: str, dtype: str = "float32", workdir: str | None = None,
         progress: Progress | None = None) -> Backbone:
    """Read (GGUF or HF), check shapes, publish; the tokenizer of a GGUF goes to `workdir`."""
    report = progress or quiet
    if path.endswith(".gguf"):
        raw_cfg, tensors, tok_path, gen = _from_gguf(path, workdir, report)
    else:
        report("reading weights")
        raw_cfg, tensors, tok_path, gen = _from_hf(path)
    cfg = config_from(raw_cfg)
    if cfg.tied:
        tensors.pop("lm_head.weight", None)
    tensors, keep = check_shapes(path, tensors, expected_shapes(cfg)), frozenset()
    if dtype == "int8":
        report("quantizing to int8")
        tensors, keep = quantize_matrices(tensors)
    report("publishing weights")
    fd, manifest, region, weights = publish(name, tensors, dtype, keep)
    del tensors
    dims = target_dims(cfg)
    info = BackboneInfo(
        name=name, family=Family.DECODER, model_type=cfg.model_type, hidden=cfg.hidden,
        layers=cfg.layers, heads=cfg.heads, intermediate=cfg.intermediate, dtype=dtype,
        region_bytes=manifest.size, checksum=manifest.checksum,
        targets=[TargetInfo(name=n, path=p, in_features=dims[n][0], out_features=dims[n][1])
                 for n, p in TARGETS.items()],
        max_positions=cfg.max_positions, vocab=cfg.vocab, tokenizer=tok_path,
        generation=GenerationInfo(context=cfg.max_positions, **gen))
    return Backbone(name, path, Family.DECODER, dtype, cfg, fd, manifest, region, weights, info)


def quantize_matrices(tensors: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """The "int8" dtype: every matrix (the 7 targets of each layer, the token embeddings, an untied
    LM head) becomes int8 with per-row float32 scales under NAME + SCALE_SUFFIX (kernels.int8);
    norms stay as they are (published in float32). Returns the tensors and the names to keep."""
    out, keep = {}, set()
    for key, t in tensors.items():
        if t.dim() == 2:
            out[key], out[key + SCALE_SUFFIX] = quantize_per_channel(t)
            keep.update((key, key + SCALE_SUFFIX))
        else:
            out[key] = t
    return out, frozenset(keep)


def _from_gguf(path: str, workdir: str | None, report: Progress):
    from fmplexd.families.decoder.gguf import read_gguf, tokenizer_from_metadata
    raw_cfg, tensors, md = read_gguf(path, report)
    workdir = workdir or tempfile.mkdtemp(prefix="fmplex-decoder-")
    os.makedirs(workdir, mode=0o755, exist_ok=True)
    tok_path = os.path.join(workdir, "tokenizer.json")
    tokenizer_from_metadata(md).save(tok_path)
    os.chmod(tok_path, 0o644)
    eos = md.get("tokenizer.ggml.eos_token_id")
    bos = md.get("tokenizer.ggml.bos_token_id")
    gen = {"eos_ids": [int(eos)] if eos is not None else [],
           "bos_id": int(bos) if bos is not None else None,
           "chat_template": md.get("tokenizer.chat_template") or ""}
    return raw_cfg, tensors, tok_path, gen


def _from_hf(path: str):
    with open(os.path.join(path, "config.json")) as f:
        raw_cfg = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    tok_path = os.path.join(path, "tokenizer.json")
    template = ""
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            template = json.load(f).get("chat_template") or ""
    except (OSError, ValueError):
        pass
    eos = raw_cfg.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    bos = raw_cfg.get("bos_token_id")
    gen = {"eos_ids": eos_ids, "bos_id": bos, "chat_template": template}
    return raw_cfg, tensors, tok_path if os.path.exists(tok_path) else "", gen

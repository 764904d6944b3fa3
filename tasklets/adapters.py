"""Read a task's extension from disk into slot tensors (numpy only; no torch in task processes).

Sources:
- a PEFT adapter directory exactly as PEFT saves it: adapter_config.json + adapter_model.safetensors
  (peft_type LORA, IA3 or PROMPT_TUNING). Tensor keys are matched against the backbone's targets
  (BackboneInfo.targets: each target's PEFT module path inside a layer, e.g. a BERT layer's
  "attention.self.query" or a Llama layer's "self_attn.q_proj"), so one loader serves every family;
- a head file (safetensors): `weight (L, H)`, `bias (L,)` for a linear head, or `w1 (D, H)`,
  `b1 (D,)`, `w2 (L, D)`, `b2 (L,)` for a 2-layer MLP head.

`validate(ext, info)` checks every tensor against the shapes the backbone implies and raises
INVALID_EXTENSION naming the tensor (and its PEFT key) with both shapes.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load_file

from ipc.errors import ErrorCode, FmplexError
from ipc.messages import (Activation, BackboneInfo, ExtensionSpec, HeadInput, HeadKind, HeadSpec,
                          Ia3Entry, LoraEntry, Pooling, TargetInfo)
from ipc.slot_layout import tensor_specs

_PEFT_WEIGHT_NAME = re.compile(r"\.(lora_[AB])\.default\.weight$")


def _invalid(why: str) -> FmplexError:
    return FmplexError(ErrorCode.INVALID_EXTENSION, why)


@dataclass(slots=True)
class Extension:
    """An extension ready to be written into a slot: its spec and tensors by slot name."""
    spec: ExtensionSpec
    tensors: dict[str, np.ndarray]
    sources: dict[str, str] = field(default_factory=dict)    # slot name -> key in the source file


def _read_adapter(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    cfg_path = os.path.join(path, "adapter_config.json")
    st_path = os.path.join(path, "adapter_model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise _invalid(f"{path}: {os.path.basename(p)} not found (expected a PEFT adapter dir)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        tensors = load_file(st_path)
    except (OSError, ValueError) as e:
        raise _invalid(f"{path}: unreadable adapter ({e})") from None
    if not isinstance(cfg, dict):
        raise _invalid(f"{cfg_path}: not a JSON object")
    return cfg, tensors


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module path ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module_path):
            return value
    return default


def _key_pattern(targets: list[TargetInfo]) -> tuple[re.Pattern, dict[str, str]]:
    """A regex over PEFT tensor keys, and path -> target: `...layer[s].N.<target path>.<part>`
    for per-layer targets, `[base_model.model.]<target path>.<part>` (layer 0) for modules of the
    whole model (TargetInfo.per_layer false)."""
    by_path = {t.path: t.name for t in targets}

    def alternatives(per_layer: bool) -> str:
        paths = sorted((t.path for t in targets if t.per_layer is per_layer), key=len, reverse=True)
        return "|".join(re.escape(p) for p in paths) or "(?!)"
    part = r"\.(lora_A\.weight|lora_B\.weight|ia3_l)$"
    return re.compile(r"(?:(?:.*\.)?layers?\.(\d+)\.(" + alternatives(True) + r")" + part + "|"
                      r"(?:base_model\.model\.)?()(" + alternatives(False) + r")" + part + ")"), by_path


def load_peft_adapter(path: str, targets: list[TargetInfo]
                      ) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """-> (ExtensionSpec keyword fields, slot tensors, slot name -> PEFT key)."""
    cfg, raw = _read_adapter(path)
    key_re, by_path = _key_pattern(targets)
    kind = cfg.get("peft_type")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise _invalid(f"{path}: {flag}=true is not supported")
    if cfg.get("bias", "none") != "none":
        raise _invalid(f"{path}: trained biases (bias={cfg['bias']!r}) are not supported")
    if kind == "PROMPT_TUNING":
        if "prompt_embeddings" not in raw:
            raise _invalid(f"{path}: prompt tuning adapter without prompt_embeddings")
        p = raw["prompt_embeddings"]
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise _invalid(f"{path}: prompt tuning with several transformer submodules")
        return ({"prompt_tokens": int(p.shape[0])}, {"prompt": p.astype(np.float32)},
                {"prompt": "prompt_embeddings"})
    if kind not in ("LORA", "IA3"):
        raise _invalid(f"{path}: peft_type {kind!r} is not supported (LORA, IA3, PROMPT_TUNING)")
    lora, ia3, tensors, sources = {}, [], {}, {}
    for key, arr in raw.items():
        key = _PEFT_WEIGHT_NAME.sub(r".\1.weight", key)
        m = key_re.match(key)
        if m is None:
            raise _invalid(f"{path}: tensor {key!r} targets no module of this backbone "
                           f"(targets: {', '.join(by_path)})")
        g = 1 if m.group(2) is not None else 4          # per-layer match, or whole-model match
        layer = int(m.group(g) or 0)
        module, part = by_path[m.group(g + 1)], m.group(g + 2)
        base = f"{layer}.{module}"
        if part == "ia3_l":
            feedforward = arr.ndim == 2 and arr.shape[0] == 1
            ia3.append(Ia3Entry(layer=layer, module=module, feedforward=feedforward))
            tensors[f"ia3.{base}"] = arr.reshape(-1).astype(np.float32)
            sources[f"ia3.{base}"] = key
        else:
            ab = "A" if part.startswith("lora_A") else "B"
            tensors[f"lora.{base}.{ab}"] = arr.astype(np.float32)
            sources[f"lora.{base}.{ab}"] = key
            lora.setdefault((layer, module), m.group(0)[: m.start(g + 2) - 1])
    entries = []
    for (layer, module), module_path in sorted(lora.items()):
        a = tensors.get(f"lora.{layer}.{module}.A")
        if a is None or f"lora.{layer}.{module}.B" not in tensors:
            raise _invalid(f"{path}: {module_path} has lora_A without lora_B or the reverse")
        rank = int(a.shape[0])
        alpha = _pattern_value(cfg.get("alpha_pattern"), module_path, cfg.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        entries.append(LoraEntry(layer=layer, module=module, rank=rank, scale=float(scale)))
    ia3.sort(key=lambda e: (e.layer, e.module))
    return {"lora": entries, "ia3": ia3}, tensors, sources


def load_head(path: str, input: HeadInput, activation: Activation = Activation.RELU
              ) -> tuple[HeadSpec, dict[str, np.ndarray]]:
    try:
        raw = load_file(path)
    except (OSError, ValueError) as e:
        raise _invalid(f"{path}: unreadable head file ({e})") from None
    if set(raw) == {"weight", "bias"}:
        w = raw["weight"]
        spec = HeadSpec(kind=HeadKind.LINEAR, input=input, num_labels=int(w.shape[0]))
        return spec, {"head.weight": w.astype(np.float32), "head.bias": raw["bias"].astype(np.float32)}
    if set(raw) == {"w1", "b1", "w2", "b2"}:
        spec = HeadSpec(kind=HeadKind.MLP, input=input, num_labels=int(raw["w2"].shape[0]),
                        hidden=int(raw["w1"].shape[0]), activation=activation)
        return spec, {f"head.{k}": v.astype(np.float32) for k, v in raw.items()}
    raise _invalid(f"{path}: a head file holds weight+bias or w1+b1+w2+b2, not {sorted(raw)}")


def build_extension(targets: list[TargetInfo], adapter: str | None = None,
                    head: str | None = None, pooling: Pooling = Pooling.CLS,
                    head_input: HeadInput = HeadInput.POOLED,
                    activation: Activation = Activation.RELU) -> Extension:
    """Read an extension's sources for a backbone with these targets (BackboneInfo.targets); not
    yet validated against its shapes (see `validate`)."""
    fields_: dict = {}
    tensors: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    if adapter:
        fields_, tensors, sources = load_peft_adapter(adapter, targets)
    head_spec = None
    if head:
        head_spec, head_tensors = load_head(head, head_input, activation)
        tensors.update(head_tensors)
        sources.update({k: f"{os.path.basename(head)}:{k[5:]}" for k in head_tensors})
    spec = ExtensionSpec(pooling=pooling, head=head_spec, **fields_)
    return Extension(spec, tensors, sources)


def validate(ext: Extension, info: BackboneInfo) -> None:
    """Every tensor has the shape the backbone implies; no tensor is missing or left over."""
    expected = {name: tuple(shape) for name, _, shape in tensor_specs(ext.spec, info)}
    for name, shape in expected.items():
        arr = ext.tensors.get(name)
        source = ext.sources.get(name, name)
        if arr is None:
            raise _invalid(f"tensor {name} ({source}) is missing")
        if tuple(arr.shape) != shape:
            raise _invalid(f"tensor {name} ({source}) has shape {tuple(arr.shape)}, "
                           f"the backbone {info.name} needs {shape}")
        if not np.isfinite(arr).all():
            raise _invalid(f"tensor {name} ({source}) holds NaN or infinite values")
    extra = sorted(set(ext.tensors) - set(expected))
    if extra:
        raise _invalid(f"tensors {extra} are not part of the extension spec")

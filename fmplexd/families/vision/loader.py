"""The vision family's loader: DINOv2 / ViT weights into a sealed region.

Formats:
    an HF directory      config.json (model_type dinov2 or vit) + *.safetensors; the hub's names
                         (encoder.layer.N.attention.attention.query, ...) or transformers 5's
                         (layers.N.attention.q_proj, ...), with or without a dinov2./vit. prefix;
                         preprocessor_config.json, when present, sets the task's pre-processing
    an .onnx file        a graph embedding an HF Dinov2Model as backbone.* (onnx_extract.py)

Weights get one canonical naming (below), are checked against the config's shapes, cast and
published (fmplexd.families.base.publish). The model's mask token, pooler and any classifier are
not needed and are skipped.

    embeddings.cls_token (1, 1, H)   embeddings.position_embeddings (1, 1 + G*G, H)
    embeddings.patch_embeddings.projection.weight (H, C, P, P) / .bias (H,)
    layer.N.norm1 / norm2 (H,)       layer.N.layer_scale1 / layer_scale2 (H,)   (DINOv2 only)
    layer.N.<target path>.weight / .bias                                          layernorm (H,)

Targets (PEFT's module paths inside a layer under transformers 5.x, for Dinov2Model and ViTModel):
    query attention.q_proj (H->H)   key attention.k_proj   value attention.v_proj
    attn_out attention.o_proj (H->H)   ffn_in mlp.fc1 (H->I)   ffn_out mlp.fc2 (I->H)
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file

from fmplexd.families.base import Backbone, Progress, quiet, layer_targets, publish_checked
from ipc.messages import BackboneInfo, Family, ImageInfo, TargetInfo

MODEL_TYPES = ("dinov2", "vit")
TARGETS = {"query": "attention.q_proj", "key": "attention.k_proj", "value": "attention.v_proj",
           "attn_out": "attention.o_proj", "ffn_in": "mlp.fc1", "ffn_out": "mlp.fc2"}
PREFIXES = ("dinov2.", "vit.", "model.")
SKIPPED = ("embeddings.mask_token", "pooler.", "classifier.")
LAYER_RENAMES = {   # a layer's module (hub / ViT names) -> canonical
    "attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "layer_scale1.lambda1": "layer_scale1", "layer_scale2.lambda1": "layer_scale2",
}
_LAYER = re.compile(r"(?:encoder\.layers?|layers)\.(\d+)\.(.+?)(\.weight|\.bias)?$")
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
RESAMPLE = {2: "bilinear", 3: "bicubic"}          # PIL's numbering, as HF processors store it


@dataclass(frozen=True, slots=True)
class VisionConfig:
    model_type: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    patch: int
    channels: int
    grid: int               # the position table holds grid x grid patch positions
    eps: float
    layer_scale: bool       # DINOv2: residual branches scaled per feature
    image: ImageInfo        # the task's pre-processing


def detect(path: str) -> bool:
    """An .onnx file (extraction decides whether it holds a backbone) or an HF directory whose
    config.json names dinov2 or vit."""
    if path.endswith(".onnx"):
        return os.path.isfile(path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") in MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def config_from(c: dict, preprocessor: dict | None = None) -> VisionConfig:
    """VisionConfig from an HF config.json dict (and preprocessor_config.json, if any)."""
    kind = c.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"model_type {kind!r} is not a vision backbone {MODEL_TYPES}")
    if c.get("use_swiglu_ffn"):
        raise ValueError("DINOv2 with a SwiGLU MLP (giant) is not supported")
    hidden = c.get("hidden_size", 768)
    dinov2 = kind == "dinov2"
    inter = hidden * c.get("mlp_ratio", 4) if dinov2 else c.get("intermediate_size", 3072)
    patch, size = c.get("patch_size", 14 if dinov2 else 16), c.get("image_size", 518 if dinov2 else 224)
    if c.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"activation {c.get('hidden_act')!r} is not supported (gelu)")
    return VisionConfig(
        model_type=kind, hidden=hidden, layers=c.get("num_hidden_layers", 12),
        heads=c.get("num_attention_heads", 12), intermediate=inter, patch=patch,
        channels=c.get("num_channels", 3), grid=size // patch,
        eps=c.get("layer_norm_eps", 1e-6 if dinov2 else 1e-12), layer_scale=dinov2,
        image=image_info(kind, size, patch, preprocessor))


def image_info(kind: str, size: int, patch: int, p: dict | None) -> ImageInfo:
    """The task's pre-processing: from preprocessor_config.json when given, else the model's
    published defaults (DINOv2: shortest edge 256, bicubic, center crop 224, ImageNet mean/std;
    ViT: resize to image_size, bilinear, mean = std = 0.5)."""
    if kind == "dinov2":
        info = {"size": 224, "resize": 256, "resample": "bicubic", "mean": IMAGENET[0],
                "std": IMAGENET[1]}
    else:
        info = {"size": size, "resize": 0, "resample": "bilinear", "mean": [0.5] * 3,
                "std": [0.5] * 3}
    if p:
        shape = p.get("size", {})
        crop = p.get("crop_size", {}) if p.get("do_center_crop", "crop_size" in p) else {}
        crop = crop.get("height", 0) if isinstance(crop, dict) else int(crop)
        if isinstance(shape, dict) and "shortest_edge" in shape:
            info.update(resize=shape["shortest_edge"], size=crop or shape["shortest_edge"])
        elif isinstance(shape, dict) and "height" in shape:
            info.update(resize=0, size=shape["height"])
        info.update(resample=RESAMPLE.get(p.get("resample"), info["resample"]),
                    mean=list(p.get("image_mean", info["mean"])),
                    std=list(p.get("image_std", info["std"])))
    return ImageInfo(patch=patch, **info)


def canonical(name: str) -> str | None:
    """The canonical name of an HF tensor name (None: a tensor fmplex does not need)."""
    for p in PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    if name.startswith(SKIPPED):
        return None
    m = _LAYER.match(name)
    if m is None:
        return name
    module = LAYER_RENAMES.get(m.group(2), m.group(2))
    return f"layer.{m.group(1)}.{module}{m.group(3) or ''}"


def read_dir(path: str) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    pre = os.path.join(path, "preprocessor_config.json")
    preprocessor = None
    if os.path.exists(pre):
        with open(pre) as f:
            preprocessor = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors file")
    weights = {}
    for file in files:
        for name, t in load_file(file).items():
            key = canonical(name)
            if key is not None:
                weights[key] = t
    return config_from(c, preprocessor), weights


def read_onnx(path: str) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    from fmplexd.families.vision.onnx_extract import extract
    c, arrays = extract(path)
    weights = {}
    for name, a in arrays.items():
        key = canonical(name)
        if key is not None:
            weights[key] = torch.from_numpy(np.array(a, dtype=np.float32))
    return config_from(c), weights


def read(path: str) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    return read_onnx(path) if path.endswith(".onnx") else read_dir(path)


def expected_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    h, i = cfg.hidden, cfg.intermediate
    shapes = {
        "embeddings.cls_token": (1, 1, h),
        "embeddings.position_embeddings": (1, 1 + cfg.grid * cfg.grid, h),
        "embeddings.patch_embeddings.projection.weight": (h, cfg.channels, cfg.patch, cfg.patch),
        "embeddings.patch_embeddings.projection.bias": (h,),
        "layernorm.weight": (h,), "layernorm.bias": (h,),
    }
    dims = {"ffn_in": (i, h), "ffn_out": (h, i)}
    for n in range(cfg.layers):
        p = f"layer.{n}."
        for target, module in TARGETS.items():
            out, inp = dims.get(target, (h, h))
            shapes[p + module + ".weight"] = (out, inp)
            shapes[p + module + ".bias"] = (out,)
        for norm in ("norm1", "norm2"):
            shapes[p + norm + ".weight"] = (h,)
            shapes[p + norm + ".bias"] = (h,)
        if cfg.layer_scale:
            shapes[p + "layer_scale1"] = (h,)
            shapes[p + "layer_scale2"] = (h,)
    return shapes


def targets(cfg: VisionConfig) -> list[TargetInfo]:
    return layer_targets(TARGETS, cfg.hidden, cfg.intermediate)


def load(name: str, path: str, dtype: str = "float32", workdir: str | None = None,
         progress: Progress | None = None) -> Backbone:
    """Read (extracting from ONNX if need be), check, publish in a sealed region, map back
    (`workdir` unused: nothing derived is written)."""
    report = progress or quiet
    report("reading weights" + (" (extracting them from the ONNX graph)"
                                if path.endswith(".onnx") else ""))
    cfg, raw = read(path)
    report("publishing weights")
    fd, manifest, region, weights = publish_checked(name, path, raw, expected_shapes(cfg), dtype)
    info = BackboneInfo(
        name=name, family=Family.VISION, model_type=cfg.model_type, hidden=cfg.hidden,
        layers=cfg.layers, heads=cfg.heads, intermediate=cfg.intermediate, dtype=dtype,
        region_bytes=manifest.size, checksum=manifest.checksum, targets=targets(cfg),
        max_positions=cfg.grid * cfg.grid, image=cfg.image)
    return Backbone(name, path, Family.VISION, dtype, cfg, fd, manifest, region, weights, info)

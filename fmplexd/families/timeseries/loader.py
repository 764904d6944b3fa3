"""The time-series family's loader: a Fracast-0 release directory into a sealed region.

A release directory (the fracast package's weights/, or a copy; or the path of its
model.safetensors) holds config.json ({"model": ...,
"pyramid": ...}) and model.safetensors (float32; the int8 file next to it is not used). The
configuration must be the architecture fmplex implements (forward.py): shared-stage dilated causal
depthwise blocks with FiLM scale conditioning, recency and periodogram-phase features, the gather
head with future-state convolution and direct quantile output. Anything else is refused by name.
Weights keep the release's names (core.*, head.*).

Targets (one module each for the whole model, PEFT paths from the model's root; TargetInfo.per_layer
false, so adapters address them as layer 0). The 10 core stages share one block, so a LoRA on
core_pw adapts every stage alike, as it does on the PEFT-wrapped model:
    core_in core.in_proj (7->D)   core_periodic core.periodic.proj (8->D)
    core_film core.scale.to_gb (8->2D)   core_pw core.block.pw (D->D)
    core_up core.block.ffn.up (D->2F)   core_down core.block.ffn.down (F->D)
    head_summary head.summary_proj (2D+5->D)   head_up head.decoder_ffns.0.up (D->2E)
    head_down head.decoder_ffns.0.down (E->D)   future_in head.future_conv.in_proj (6->D)
    future_pw head.future_conv.block.pw   future_up head.future_conv.block.ffn.up
    future_down head.future_conv.block.ffn.down   future_out head.future_conv.out_proj (D->D)
    out head.out_proj (D->Q)
The depthwise convolutions are raw parameters applied with conv1d, not modules PEFT can target.
Only float32 is served (the periodogram and the normalised values need it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from safetensors.torch import load_file

from fmplexd.families.base import Backbone, Progress, quiet, publish_checked
from ipc.messages import BackboneInfo, Family, SeriesInfo, TargetInfo

MIN_OBSERVED = 8            # finite values a series needs (the release's own rule)
REQUIRED = {                # config.json "model" settings the implemented architecture needs
    "family": "fracast", "share_stages": True, "scale_cond": "film", "recency_encoding": True,
    "periodic_phase": True, "periodic_harmonics": 1, "head_kind": "gather",
    "head_output_mode": "direct", "head_future_conv": True, "kernel_size": 3, "causal": True,
    "separable_conv": True, "head_layers": 1, "head_fc_kernel": 3, "scale_cond_dim": 8,
}


@dataclass(frozen=True, slots=True)
class FracastConfig:
    context: int            # W: the window every forward runs over
    horizon: int            # H: steps forecast at once
    quantiles: tuple[float, ...]
    d: int                  # D: model width
    stages: int             # core dilations base**0 .. base**(stages-1)
    dilation_base: int
    ffn: int                # F: the blocks' SwiGLU width
    head_ffn: int           # E: the head decoder's SwiGLU width
    fc_layers: int          # causal convolutions along the horizon (dilations 1, 2, ...)
    topk: int               # periods kept from the periodogram
    min_period: int
    alpha: float            # the periodogram's significance level
    future_layers: int      # future-state block applications (dilations base**0 ..)
    future_seed: int        # context states prepended to the future tokens
    phase_bins: int


def _model_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def detect(path: str) -> bool:
    """A directory whose config.json is a Fracast release's (model.family "fracast"), or the
    model.safetensors inside one."""
    try:
        return _model_config(carrier_dir(path))["model"].get("family") == "fracast"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def read_config(path: str) -> FracastConfig:
    c = _model_config(path)
    m, pyramid = c["model"], c.get("pyramid", {})
    wrong = {k: m.get(k) for k, v in REQUIRED.items() if m.get(k, v) != v}
    if wrong or pyramid.get("ratios") or list(m.get("level_widths") or [m["W"]]) != [m["W"]]:
        raise ValueError(f"{path}: a Fracast variant fmplex does not implement ({wrong or pyramid})")
    if m.get("head_seasonal_fill_mode", "phase_mean") != "phase_mean":
        raise ValueError(f"{path}: only the phase_mean seasonal fill is implemented")
    return FracastConfig(
        context=int(m["W"]), horizon=int(m["horizon"]),
        quantiles=tuple(float(q) for q in m["quantiles"]), d=int(m["d_model"]),
        stages=int(m.get("n_stages", 10)), dilation_base=int(m.get("dilation_base", 2)),
        ffn=int(int(m["d_model"]) * float(m.get("ffn_mult", 1.5))), head_ffn=int(m["head_d_ff"]),
        fc_layers=int(m.get("head_fc_layers", 2)), topk=int(m.get("periodic_topk", 4)),
        min_period=int(m.get("periodic_min_period", 2)),
        alpha=float(m.get("periodic_alpha", 0.05)),
        future_layers=int(m.get("head_future_conv_layers", 6)),
        future_seed=int(m.get("head_future_conv_seed", 128)),
        phase_bins=int(m.get("head_phase_bins", 16)))


# target name -> (module path, in features, out features) as functions of the config
def _target_dims(c: FracastConfig) -> dict[str, tuple[str, int, int]]:
    d, f, e = c.d, c.ffn, c.head_ffn
    return {
        "core_in": ("core.in_proj", 7, d), "core_periodic": ("core.periodic.proj", 2 * c.topk, d),
        "core_film": ("core.scale.to_gb", 8, 2 * d), "core_pw": ("core.block.pw", d, d),
        "core_up": ("core.block.ffn.up", d, 2 * f), "core_down": ("core.block.ffn.down", f, d),
        "head_summary": ("head.summary_proj", 2 * d + 5, d),
        "head_up": ("head.decoder_ffns.0.up", d, 2 * e),
        "head_down": ("head.decoder_ffns.0.down", e, d),
        "future_in": ("head.future_conv.in_proj", 6, d),
        "future_pw": ("head.future_conv.block.pw", d, d),
        "future_up": ("head.future_conv.block.ffn.up", d, 2 * f),
        "future_down": ("head.future_conv.block.ffn.down", f, d),
        "future_out": ("head.future_conv.out_proj", d, d),
        "out": ("head.out_proj", d, len(c.quantiles)),
    }


def target_paths(c: FracastConfig) -> dict[str, str]:
    return {name: path for name, (path, _, _) in _target_dims(c).items()}


def targets(c: FracastConfig) -> list[TargetInfo]:
    return [TargetInfo(name=n, path=p, in_features=i, out_features=o, per_layer=False)
            for n, (p, i, o) in _target_dims(c).items()]


def expected_shapes(c: FracastConfig) -> dict[str, tuple[int, ...]]:
    d = c.d
    shapes: dict[str, tuple[int, ...]] = {}
    for path, i, o in _target_dims(c).values():
        shapes[path + ".weight"], shapes[path + ".bias"] = (o, i), (o,)
    for block in ("core.block", "head.future_conv.block"):
        shapes.update({f"{block}.dw_weight": (d, 1, 3), f"{block}.dw_bias": (d,),
                       f"{block}.norm1.weight": (d,), f"{block}.norm2.weight": (d,)})
    for k in range(c.fc_layers):
        shapes.update({f"head.fc_blocks.{k}.dw_weight": (d, 1, 3),
                       f"head.fc_blocks.{k}.dw_bias": (d,), f"head.fc_blocks.{k}.norm.weight": (d,)})
    shapes.update({"core.norm.weight": (d,), "head.queries": (c.horizon, d),
                   "head.decoder_norms.0.weight": (d,)})
    return shapes


def load(name: str, path: str, dtype: str = "float32", workdir: str | None = None,
         progress: Progress | None = None) -> Backbone:
    """Read, check, publish in a sealed region and map it back read-only (`workdir` unused)."""
    if dtype != "float32":
        raise ValueError(f"{path}: the time-series family serves float32 only, not {dtype}")
    report = progress or quiet
    report("reading weights")
    path = carrier_dir(path)
    cfg = read_config(path)
    raw = load_file(os.path.join(path, "model.safetensors"))
    want = expected_shapes(cfg)
    unexpected = sorted(set(raw) - set(want))
    if unexpected:
        raise ValueError(f"{path}: weights the config does not have: {unexpected[:5]}")
    report("publishing weights")
    fd, manifest, region, weights = publish_checked(name, path, raw, want, dtype)
    info = BackboneInfo(
        name=name, family=Family.TIME_SERIES, model_type="fracast", hidden=cfg.d,
        layers=1, heads=1, intermediate=cfg.ffn, dtype=dtype, region_bytes=manifest.size,
        checksum=manifest.checksum, targets=targets(cfg), max_positions=cfg.context,
        series=SeriesInfo(context=cfg.context, horizon=cfg.horizon,
                          quantiles=list(cfg.quantiles), min_observed=MIN_OBSERVED))
    return Backbone(name, path, Family.TIME_SERIES, dtype, cfg, fd, manifest, region, weights, info)


def carrier_dir(path: str) -> str:
    """A release directory from a path to it or to its model.safetensors."""
    return os.path.dirname(path) if path.endswith(".safetensors") else path


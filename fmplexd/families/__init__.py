"""Backbone families: each folder supplies a loader, a forward and a runner (see base.py).

    load_backbone(name, path, dtype, workdir, progress)   the family is read from the path (config.json's
                                        model_type, a .gguf file, an .onnx graph, a Fracast
                                        release, ...); "embedded[:KEY]" paths name packaged models
    runner_for(backbone, settings)      the engine's handle on the backbone's executor
Family modules are imported on first use (they import torch; this package's import does not).
"""
from __future__ import annotations

import importlib

from ipc.messages import Family

MODULES = {Family.TEXT_ENCODER: "fmplexd.families.encoder",
           Family.DECODER: "fmplexd.families.decoder",
           Family.VISION: "fmplexd.families.vision",
           Family.TIME_SERIES: "fmplexd.families.timeseries"}
# Weight-only dtypes: the backbone's matrices are stored in them (with scales); activations, KV
# and extensions use the compute dtype. Each names its compute dtype and the families whose
# loaders quantize to it.
WEIGHT_ONLY = {"int8": ("float32", (Family.DECODER,))}


def compute_dtype(dtype: str) -> str:
    """The dtype activations, the KV pool and extensions use on a backbone of weight `dtype`."""
    return WEIGHT_ONLY[dtype][0] if dtype in WEIGHT_ONLY else dtype


def family_module(family: Family):
    return importlib.import_module(MODULES[family])


def detect(path: str) -> Family:
    """The family of the backbone at `path` (ValueError if no family recognises it)."""
    for family in MODULES:
        if family_module(family).detect(path):
            return family
    raise ValueError(f"{path}: not a backbone of any supported family "
                     f"({', '.join(f.value for f in MODULES)})")


def load_backbone(name: str, path: str, dtype: str = "float32", workdir: str | None = None,
                  progress=None):
    """Load, check and publish a backbone in its sealed region (fmplexd.families.base.Backbone).
    `workdir`: a directory for files derived from the weights (e.g. a GGUF's tokenizer.json) that
    task processes read; `progress(text)`: told the loader's stages (reading, dequantizing tensor
    i/n, publishing)."""
    from fmplexd.families.embedded import resolve
    path = resolve(path)
    family = detect(path)
    if dtype in WEIGHT_ONLY and family not in WEIGHT_ONLY[dtype][1]:
        raise ValueError(f"backbone {name}: dtype {dtype!r} is for "
                         f"{', '.join(f.value for f in WEIGHT_ONLY[dtype][1])} backbones "
                         f"only; {path} is a {family.value} backbone")
    return family_module(family).load(name, path, dtype, workdir, progress=progress)


def runner_for(backbone, settings):
    """The backbone's runner; `settings` is the daemon's config (batch sizes, budgets)."""
    return family_module(backbone.family).make_runner(backbone, settings)

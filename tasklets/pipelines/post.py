"""Post-processing shared by the pipelines (numpy only): softmax, L2 normalisation, top-k labels."""
from __future__ import annotations

import numpy as np

from ipc.messages import LabelScore


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def top_k(probs: np.ndarray, labels: tuple[str, ...], k: int) -> list[LabelScore]:
    """The k most probable labels of one row, most probable first (ties: label order)."""
    k = min(k, len(probs))
    idx = np.argsort(-probs, kind="stable")[:k]
    return [LabelScore(label=labels[i], score=float(probs[i])) for i in idx]


def labelled(logits: np.ndarray, labels: tuple[str, ...], k: int) -> list[list[LabelScore]]:
    """Per row of head logits (n, L): its top-k labels with softmax scores."""
    return [top_k(row, labels, k) for row in softmax(logits)]

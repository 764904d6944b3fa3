"""Train the demo's image classifier honestly, in seconds: a linear head on DINOv2-small's CLS
features of random crops of scikit-learn's two sample photographs (a temple in China and a flower),
with the same forward the daemon serves and the same pre-processing its task process applies.

The head is written as a safetensors file (weight (2, 384), bias (2,)); held-out crops (other
seeds) check it. This is demo code: torch runs here, in the demo's own process, not in a task.
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from fmplex.demo.samples import sample_images
from fmplexd.families.batch_runner import bare_view
from fmplexd.families.embedded import embedded_path
from fmplexd.families.vision.executor import Executor, WorkItem
from fmplexd.families.vision.forward import VisionTransformer
from fmplexd.families.vision.loader import read
from ipc.messages import Output
from tasklets.pipelines.vision import preprocess

LABELS = {"china": "temple", "flower": "flower"}


@dataclass(frozen=True, slots=True)
class TrainedHead:
    head_path: str
    labels: list[str]
    train_accuracy: float
    seconds: float
    examples: int


def crops(seed: int, per_image: int) -> list[tuple[bytes, str]]:
    """Random crops (a fifth to two thirds of each side, anywhere) of the sample photographs as
    JPEG bytes, with their labels."""
    rng = np.random.default_rng(seed)
    out = []
    for name, data in sample_images().items():
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        for _ in range(per_image):
            cw, ch = (int(rng.uniform(0.2, 0.67) * s) for s in (w, h))
            x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            buf = io.BytesIO()
            img.crop((x, y, x + cw, y + ch)).save(buf, "JPEG", quality=90)
            out.append((buf.getvalue(), LABELS[name]))
    return out


def train_scene_head(out_dir: str, per_image: int = 8, steps: int = 60) -> TrainedHead:
    cfg, weights = read(embedded_path("dinov2"))
    executor = Executor(VisionTransformer(cfg, weights))
    labels = sorted(set(LABELS.values()))
    examples = crops(seed=1, per_image=per_image)
    t0 = time.perf_counter()
    pixels = np.stack([preprocess(Image.open(io.BytesIO(b)), cfg.image) for b, _ in examples])
    view = bare_view()
    (tokens,) = executor.run([WorkItem(view, Output.TOKENS, pixels)])
    x = torch.from_numpy(tokens).view(len(examples), -1, cfg.hidden)[:, 0]     # CLS rows
    y = torch.tensor([labels.index(label) for _, label in examples])
    head = {"weight": torch.zeros(len(labels), cfg.hidden, requires_grad=True),
            "bias": torch.zeros(len(labels), requires_grad=True)}
    opt = torch.optim.AdamW(list(head.values()), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(x, head["weight"], head["bias"]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (F.linear(x, head["weight"], head["bias"]).argmax(1) == y).float().mean().item()
    path = os.path.join(out_dir, "scenes-head.safetensors")
    save_file({k: v.detach().contiguous() for k, v in head.items()}, path)
    return TrainedHead(path, labels, acc, time.perf_counter() - t0, len(examples))

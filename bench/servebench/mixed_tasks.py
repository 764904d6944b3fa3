"""The mixed-family workload's tasks and requests (bench/serve.py --workload mixed).

Task i belongs to family FAMILIES[i % 3], so under the zipf popularity every family has popular and
rare tasks. Deterministic (seeded by i), random weights (the benchmark measures serving):
    text    bench/servebench/tasks.py's task i on all-MiniLM-L6-v2: LoRA + linear head,
            text-classification                                                      weight 1
    vision  DINOv2-small: LoRA of rank 4 or 8 (i mod 2) on query and value of all 12 layers and a
            linear head of 2 + i mod 4 labels on the CLS row, image-classification  weight 2
    series  Fracast-0: LoRA of rank 4 on the core block's pointwise layer and the head's summary
            and output projections, time-series-forecasting                          weight 1
Requests (a Payload builds the client message when it is sent):
    text    one text of random common words (bench/workload.py's lengths)
    vision  one of 8 JPEG crops of scikit-learn's sample photographs
    series  a window of 256 .. 1024 values of statsmodels' co2, elnino or sunspots series, 48 steps

A decoder family (e.g. SmolLM2) would be one more entry of FAMILIES, BACKBONES and WEIGHTS, a task
writer and a Payload (GenerateText); its per-task baseline needs streaming, which
bench/family_baseline.py does not serve.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

FAMILIES = ("text", "vision", "series")
BACKBONES = {"text": "embedded", "vision": "embedded:dinov2", "series": "embedded:fracast"}
NAMES = {"text": "default", "vision": "vision", "series": "series"}     # backbone names
WEIGHTS = {"text": 1.0, "vision": 2.0, "series": 1.0}


@dataclass(frozen=True, slots=True)
class MixedTask:
    index: int
    name: str
    family: str
    spec_path: str
    weight: float


@dataclass(frozen=True, slots=True)
class Payload:
    """One request's input; `message(ref, timeout_s)` is what a client sends."""
    family: str
    data: object               # text (str), an encoded image (bytes) or a series (np.ndarray)

    def message(self, ref: int, timeout_s: float):
        from ipc.messages import PROTOCOL_VERSION, Infer, InferImages, InferSeries
        common = {"ref": ref, "timeout_ms": int(timeout_s * 1e3), "proto": PROTOCOL_VERSION}
        if self.family == "text":
            return Infer(texts=[self.data], **common)
        if self.family == "vision":
            return InferImages(images=[self.data], **common)
        return InferSeries(values=self.data[None], horizon=48, **common)


def _write_lora(path: str, modules: dict[str, tuple[int, int]], rank: int, alpha: float,
                seed: int) -> None:
    """A random PEFT LoRA directory: `modules` maps each module's key prefix (as PEFT saves it,
    without `.lora_A.weight`) to its (in, out) features."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for key, (fan_in, fan_out) in modules.items():
        tensors[f"{key}.lora_A.weight"] = (rng.normal(0, 1, (rank, fan_in)) / fan_in ** 0.5
                                           ).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.02, (fan_out, rank)).astype(np.float32)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none",
                   "target_modules": sorted({k.rsplit(".", 1)[1] for k in modules})}, f)


def _write_head(path: str, labels: int, hidden: int, seed: int) -> None:
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    save_file({"weight": (rng.normal(0, 0.1, (labels, hidden))).astype(np.float32),
               "bias": np.zeros(labels, np.float32)}, path)


def write_mixed_task(work: str, i: int) -> MixedTask:
    family = FAMILIES[i % len(FAMILIES)]
    if family == "text":
        from bench.servebench.tasks import write_task
        from fmplexd.families.embedded import embedded_path
        from fmplexd.families.encoder.loader import read_config
        c = read_config(embedded_path("minilm"))
        t = write_task(work, i, c.hidden, c.intermediate, c.layers)
        return MixedTask(i, t.name, family, t.spec_path, WEIGHTS[family])
    name = f"{family[0]}{i:03d}"
    d = os.path.join(work, name)
    spec = os.path.join(d, "task.toml")
    if not os.path.exists(spec):
        os.makedirs(d, exist_ok=True)
        if family == "vision":
            rank, labels = (4, 8)[i % 2], 2 + i % 4
            _write_lora(os.path.join(d, "lora"), {
                f"base_model.model.encoder.layer.{n}.attention.{m}": (384, 384)
                for n in range(12) for m in ("q_proj", "v_proj")}, rank, 2.0 * rank, 2000 + i)
            _write_head(os.path.join(d, "head.safetensors"), labels, 384, 3000 + i)
            names = ", ".join(f'"label{k}"' for k in range(labels))
            body = (f'pipeline = "image-classification"\nlabels = [{names}]\npooling = "cls"\n'
                    f'[extension]\nadapter = "lora"\nhead = "head.safetensors"\n')
        else:
            _write_lora(os.path.join(d, "lora"), {
                "base_model.model.core.block.pw": (64, 64),
                "base_model.model.head.summary_proj": (133, 64),
                "base_model.model.head.out_proj": (64, 9)}, 4, 8.0, 4000 + i)
            body = 'pipeline = "time-series-forecasting"\n[extension]\nadapter = "lora"\n'
        with open(spec, "w") as f:
            f.write(f'name = "{name}"\nbackbone = "{NAMES[family]}"\nweight = {WEIGHTS[family]}\n'
                    f'queue_limit = 1000000\ndeadline_ms = 3600000\n{body}')
    return MixedTask(i, name, family, spec, WEIGHTS[family])


class Inputs:
    """The requests' inputs by family, built once (photo crops, series windows, texts)."""

    def __init__(self, seed: int = 0):
        from bench.workload import WorkloadSpec, texts
        from fmplex.demo.samples import sample_series
        from fmplex.demo.vision import crops
        self.rng = np.random.default_rng(seed)
        self.images = [b for b, _ in crops(seed=seed + 11, per_image=4)]
        self.series = [sample_series(n) for n in ("co2", "elnino", "sunspots")]
        self.texts = [e.text for e in texts(WorkloadSpec(n_tasks=1), 64, seed_offset=seed + 5)]

    def payload(self, family: str) -> Payload:
        rng = self.rng
        if family == "text":
            return Payload(family, self.texts[rng.integers(len(self.texts))])
        if family == "vision":
            return Payload(family, self.images[rng.integers(len(self.images))])
        s = self.series[rng.integers(len(self.series))]
        n = int(rng.integers(min(256, len(s) - 8), min(1024, len(s)) + 1))
        end = int(rng.integers(n, len(s) + 1))
        return Payload(family, np.ascontiguousarray(s[end - n:end]))

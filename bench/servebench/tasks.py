"""The benchmark's tasks: TaskDef, write_task (a task's spec, LoRA and head on disk) and TaskBank.

Task i is deterministic (seeded by i): a LoRA of rank RANKS[i % 3] on TARGETS[i % 4] in every
layer and a linear head of 2 + i % 4 labels, random weights (the benchmark measures serving, not
accuracy). Files are written once under the bank's work directory and reused; every system (and
bench/profile_daemon.py) serves the same files."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TaskDef:
    index: int
    name: str
    spec_path: str
    rank: int
    modules: tuple[str, ...]
    labels: int


RANKS = (4, 8, 16)
TARGETS = (("query", "value"), ("query", "key", "value"), ("query", "value", "ffn_in"),
           ("attn_out", "ffn_in", "ffn_out"))


def write_task(work: str, i: int, hidden: int, intermediate: int, layers: int) -> TaskDef:
    """Task i: LoRA of rank RANKS[i % 3] on TARGETS[i % 4] in every layer + a linear head of
    2 + i % 4 labels (random weights: the benchmark measures serving, not accuracy)."""
    import torch
    from safetensors.torch import save_file
    from fmplex.demo.train import Recipe, write_peft_lora
    name = f"t{i:03d}"
    d = os.path.join(work, name)
    spec_path = os.path.join(d, "task.toml")
    rank, targets, n_labels = RANKS[i % len(RANKS)], TARGETS[i % len(TARGETS)], 2 + i % 4
    if not os.path.exists(spec_path):
        g = torch.Generator().manual_seed(1000 + i)
        modules = tuple(targets)
        lora = {}
        for layer in range(layers):
            for m in modules:
                fan_out, fan_in = (intermediate, hidden) if m == "ffn_in" else \
                    (hidden, intermediate) if m == "ffn_out" else (hidden, hidden)
                lora[(layer, m)] = (torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5,
                                    torch.randn(fan_out, rank, generator=g) * 0.02)
        recipe = Recipe(task=name, rank=rank, alpha=2.0 * rank, modules=modules,
                        layers=tuple(range(layers)))
        write_peft_lora(os.path.join(d, "lora"), lora, recipe)
        save_file({"weight": torch.randn(n_labels, hidden, generator=g) * 0.1,
                   "bias": torch.zeros(n_labels)}, os.path.join(d, "head.safetensors"))
        labels = ", ".join(f'"label{k}"' for k in range(n_labels))
        with open(spec_path, "w") as f:
            f.write(f'name = "{name}"\npipeline = "text-classification"\nlabels = [{labels}]\n'
                    f'pooling = "mean"\nqueue_limit = 1000000\ndeadline_ms = 3600000\n'
                    f'[extension]\nadapter = "lora"\nhead = "head.safetensors"\n')
    return TaskDef(i, name, spec_path, rank, targets, n_labels)


class TaskBank:
    """Writes task definitions on first use (the capacity phase may need hundreds)."""

    def __init__(self, work: str, backbone_dir: str):
        from fmplexd.families.encoder.loader import read_config
        self.work, self.cfg = work, read_config(backbone_dir)
        self._tasks: dict[int, TaskDef] = {}

    def __getitem__(self, i: int) -> TaskDef:
        if i not in self._tasks:
            c = self.cfg
            self._tasks[i] = write_task(self.work, i, c.hidden, c.intermediate, c.layers)
        return self._tasks[i]

    def first(self, n: int) -> list[TaskDef]:
        return [self[i] for i in range(n)]


def describe(tasks: list[TaskDef]) -> dict:
    """serve.json's "tasks": a sentence, and each task's definition (without its path)."""
    return {"description": (
        f"{len(tasks)} text-classification tasks; task i has a LoRA of rank "
        f"{'/'.join(map(str, RANKS))} (i mod 3) on "
        f"{' | '.join('+'.join(t) for t in TARGETS)} (i mod 4) in all 6 layers, alpha = 2 x "
        f"rank, and a linear head of 2 + (i mod 4) labels on mean pooling"),
        "per_task": [dataclasses.asdict(t) | {"spec_path": None} for t in tasks]}

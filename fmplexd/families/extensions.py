"""Per-batch extension segments shared by the families' forwards: for each (layer, target) linear
layer, the LoRA and IA3 segments of the tasks whose rows a packed batch holds.

A task's rows must be contiguous in the packed batch (the runners order rows by task), so each of
its extensions applies to one row range: the segmented kernels (kernels.lora, kernels.scaling) do
one small matmul or scale per task and never materialise a dense per-task delta.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.lora import LoraSegment, segmented_lora
from kernels.scaling import ScaleSegment, segmented_scale, segmented_scale_


@dataclass(slots=True)
class ModuleExt:
    """Everything the tasks of one batch add to one linear layer."""
    lora: list[LoraSegment] = field(default_factory=list)
    scale_in: list[ScaleSegment] = field(default_factory=list)
    scale_out: list[ScaleSegment] = field(default_factory=list)

    def scaled(self, rows: int) -> ModuleExt:
        """The same segments on a tensor with `rows` rows per row of the original (segments over
        series applied at every time step: (B * L, D) rows, rows = L)."""
        def each(segs):
            return [replace(s, start=s.start * rows, end=s.end * rows) for s in segs]
        return ModuleExt(each(self.lora), each(self.scale_in), each(self.scale_out))


def module_extensions(task_rows) -> dict[tuple[int, str], ModuleExt]:
    """task_rows: [(ExtensionView, first row, end row)] -> {(layer, target): ModuleExt}."""
    ext: dict = {}
    for view, s, e in task_rows:
        for layer, module, A, B, scale in view.lora:
            ext.setdefault((layer, module), ModuleExt()).lora.append(LoraSegment(s, e, A, B, scale))
        for layer, module, vec, feedforward in view.ia3:
            m = ext.setdefault((layer, module), ModuleExt())
            (m.scale_in if feedforward else m.scale_out).append(ScaleSegment(s, e, vec))
    return ext


def extended_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    ext: ModuleExt | None, owned: bool = False,
                    base: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """y = linear(x) with the batch's extensions of this layer, in PEFT's order: IA3 input scaling
    -> base linear (+ bias) -> + LoRA (on the same scaled input) -> IA3 output scaling. `owned`: x
    is a temporary of this layer only, so input scaling may happen in place. `base(x)`, when
    given, is the base linear (a quantized weight's kernel) in place of F.linear(x, weight, bias)."""
    if ext is None:
        return base(x) if base is not None else F.linear(x, weight, bias)
    x = (segmented_scale_ if owned else segmented_scale)(x, ext.scale_in)
    y = base(x) if base is not None else F.linear(x, weight, bias)
    segmented_lora(y, x, ext.lora)
    return segmented_scale_(y, ext.scale_out)

"""Per-task extension slots: a private, double-buffered, versioned region for each task.

A slot is one memfd of two halves. The task maps it read-write, the daemon read-only. Protocol:
the task writes the half the daemon granted, sends Commit(generation, half); the daemon turns that
half into the active `ExtensionView` (version + 1) and grants the other half for the next update,
but only once no batch in flight still reads it (see `Slot.drained`). Batches pin the view they
started with, so an update never changes a batch mid-forward. Layouts come from the daemon-side
spec (ipc.slot_layout), never from anything the task wrote, so a task can only spoil its own output.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import torch

from fmplexd.families import compute_dtype
from ipc.messages import (BackboneInfo, ExtensionSpec, HeadInput, HeadKind, Pooling, SlotEntry,
                          SlotGrant)
from ipc.shm import MappedRegion, create_region
from ipc.slot_layout import half_layout
from kernels.heads import HeadSegment


@dataclass(slots=True)
class ExtensionView:
    """One committed version of a task's extension: torch views of one half of its slot."""
    version: int
    spec: ExtensionSpec
    lora: list[tuple[int, str, torch.Tensor, torch.Tensor, float]]    # layer, target, A, B, scale
    ia3: list[tuple[int, str, torch.Tensor, bool]]                    # layer, target, vector, in?
    prompt: torch.Tensor | None
    head: HeadSegment | None       # start/end unset (0, 0); the executor places it
    in_flight: int = 0             # batches currently reading this view

    @property
    def pooling(self) -> Pooling:
        return self.spec.pooling

    @property
    def prompt_tokens(self) -> int:
        return self.spec.prompt_tokens

    @property
    def head_input(self) -> HeadInput | None:
        return self.spec.head.input if self.spec.head else None


def build_view(region: MappedRegion, entries: list[SlotEntry], base: int, spec: ExtensionSpec,
               version: int) -> ExtensionView:
    t = {e.name: region.tensor(e, base) for e in entries}
    lora = [(e.layer, e.module, t[f"lora.{e.layer}.{e.module}.A"],
             t[f"lora.{e.layer}.{e.module}.B"], e.scale) for e in spec.lora]
    ia3 = [(e.layer, e.module, t[f"ia3.{e.layer}.{e.module}"], e.feedforward) for e in spec.ia3]
    head = None
    if spec.head is not None:
        if spec.head.kind is HeadKind.LINEAR:
            head = HeadSegment(0, 0, t["head.weight"], t["head.bias"])
        else:
            head = HeadSegment(0, 0, t["head.w1"], t["head.b1"], t["head.w2"], t["head.b2"],
                               spec.head.activation.value)
    return ExtensionView(version, spec, lora, ia3, t.get("prompt"), head)


class Slot:
    """A task's extension region. Owned by the daemon; fd handed to the task by the handle plane."""

    def __init__(self, task: str, spec: ExtensionSpec, info: BackboneInfo, generation: int,
                 version: int = 0):
        self.spec, self.generation, self.version = spec, generation, version
        self.entries, self.half_bytes = half_layout(spec, info, compute_dtype(info.dtype))
        self.size = 2 * self.half_bytes
        self.fd = create_region(f"fmplex-slot-{task}", self.size)
        self.region = MappedRegion(self.fd, self.size, writable=False)
        self.token = secrets.token_bytes(16)
        self.writable_half = 0
        self.active: ExtensionView | None = None

    def grant(self) -> SlotGrant:
        return SlotGrant(generation=self.generation, size=self.size, half_bytes=self.half_bytes,
                         half=self.writable_half, entries=self.entries, token=self.token)

    def fits(self, spec: ExtensionSpec, info: BackboneInfo) -> bool:
        """Whether a new spec has exactly this slot's tensor layout (so it can reuse the slot)."""
        return half_layout(spec, info, compute_dtype(info.dtype)) == (self.entries, self.half_bytes)

    def commit(self, half: int, spec: ExtensionSpec | None = None) -> ExtensionView | None:
        """Activate `half` (with `spec`, which must fit this layout). Returns the replaced view."""
        if half != self.writable_half:
            raise ValueError(f"half {half} is not the granted half {self.writable_half}")
        self.spec = spec or self.spec
        self.version += 1
        old = self.active
        self.active = build_view(self.region, self.entries, half * self.half_bytes, self.spec,
                                 self.version)
        self.writable_half = 1 - half
        return old

    def close(self) -> None:
        """Drop the daemon's mapping and fd (idempotent); views pinned by batches stay valid."""
        if self.fd >= 0:
            self.region.close()
            os.close(self.fd)
            self.fd = -1


def drained(view: ExtensionView | None) -> bool:
    """True when no batch reads `view` any more, so its half may be rewritten."""
    return view is None or view.in_flight == 0

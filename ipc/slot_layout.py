"""Which tensors an extension spec needs, with their shapes, and where they lie in a task's slot.

Shared by the daemon (which validates specs and allocates slots) and task processes (which write
their tensors there); numpy only. A slot is two halves of `half_bytes`; a half holds one version of
the extension: every tensor at a 256-byte aligned offset, laid out in the order `tensor_specs` gives.

Tensor names and shapes (H = hidden, I = intermediate, r = rank, L = labels, D = head hidden):
    lora.{layer}.{module}.A   (r, in)       lora.{layer}.{module}.B   (out, r)   (PEFT's layout)
    ia3.{layer}.{module}      (in,) if feedforward else (out,)
    prompt                    (prompt_tokens, H)
    head.weight (L, H), head.bias (L,)                                  linear head
    head.w1 (D, H), head.b1 (D,), head.w2 (L, D), head.b2 (L,)          MLP head
where (in, out) of a module are its in_features/out_features in the backbone's `targets` (the
family states them: e.g. a BERT layer's query is (H, H) and its ffn_in (H, I)). A target that is
not per layer (one module of the whole model, e.g. a time-series model's output projection) is
addressed as layer 0.
"""
from __future__ import annotations

from ipc.errors import ErrorCode, FmplexError
from ipc.messages import BackboneInfo, ExtensionSpec, HeadKind, SlotEntry
from ipc.shm import align_up, plan_layout

SLOT_ALIGNMENT = 256
PAGE = 4096


def module_dims(module: str, info: BackboneInfo) -> tuple[int, int]:
    """(in_features, out_features) of a targeted linear layer; INVALID_EXTENSION if the backbone's
    family has no such target."""
    for t in info.targets:
        if t.name == module:
            return t.in_features, t.out_features
    raise _invalid(f"the backbone {info.name} ({info.family.value}) has no target {module!r} "
                   f"(it has {[t.name for t in info.targets]})")


def _invalid(why: str) -> FmplexError:
    return FmplexError(ErrorCode.INVALID_EXTENSION, why)


def tensor_specs(spec: ExtensionSpec, info: BackboneInfo, dtype: str = "float32"
                 ) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of every tensor the spec needs. Raises INVALID_EXTENSION naming what the
    backbone lacks (a layer past its depth, a duplicate target, a prompt longer than positions)."""
    out: list[tuple[str, str, list[int]]] = []
    seen: set[tuple[str, int, str]] = set()
    for e in spec.lora:
        _check_target("lora", e.layer, e.module, info, seen)
        fan_in, fan_out = module_dims(e.module, info)
        if e.rank > min(fan_in, fan_out):
            raise _invalid(f"lora.{e.layer}.{e.module}: rank {e.rank} exceeds the layer's "
                           f"{fan_in}x{fan_out} shape")
        out.append((f"lora.{e.layer}.{e.module}.A", dtype, [e.rank, fan_in]))
        out.append((f"lora.{e.layer}.{e.module}.B", dtype, [fan_out, e.rank]))
    for e in spec.ia3:
        _check_target("ia3", e.layer, e.module, info, seen)
        fan_in, fan_out = module_dims(e.module, info)
        out.append((f"ia3.{e.layer}.{e.module}", dtype, [fan_in if e.feedforward else fan_out]))
    if spec.prompt_tokens:
        if spec.prompt_tokens + 2 > info.max_positions:
            raise _invalid(f"prompt of {spec.prompt_tokens} virtual tokens leaves no room in "
                           f"{info.max_positions} positions")
        out.append(("prompt", dtype, [spec.prompt_tokens, info.hidden]))
    head = spec.head
    if head is not None:
        n, h = head.num_labels, info.hidden
        if head.kind is HeadKind.LINEAR:
            out += [("head.weight", dtype, [n, h]), ("head.bias", dtype, [n])]
        else:
            if head.hidden < 1:
                raise _invalid("an MLP head needs hidden > 0")
            d = head.hidden
            out += [("head.w1", dtype, [d, h]), ("head.b1", dtype, [d]),
                    ("head.w2", dtype, [n, d]), ("head.b2", dtype, [n])]
    return out


def _check_target(kind: str, layer: int, module: str, info: BackboneInfo, seen: set) -> None:
    if layer >= info.layers:
        raise _invalid(f"{kind}.{layer}.{module}: the backbone has {info.layers} layers")
    if layer and not next((t.per_layer for t in info.targets if t.name == module), True):
        raise _invalid(f"{kind}.{layer}.{module}: {module} is one module of the whole model "
                       f"(layer 0 only)")
    key = (kind, layer, module)
    if key in seen:
        raise _invalid(f"{kind}.{layer}.{module} is listed twice")
    seen.add(key)


def half_layout(spec: ExtensionSpec, info: BackboneInfo, dtype: str = "float32"
                ) -> tuple[list[SlotEntry], int]:
    """Entries (offsets inside one half) and the half size in bytes (page aligned, >= one page)."""
    manifest_entries, size = plan_layout(tensor_specs(spec, info, dtype), SLOT_ALIGNMENT)
    entries = [SlotEntry(name=e.name, dtype=e.dtype, shape=e.shape, offset=e.offset)
               for e in manifest_entries]
    return entries, max(align_up(size, PAGE), PAGE)

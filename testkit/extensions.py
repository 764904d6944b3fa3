"""Extension helpers for tests and benchmarks: write an extension into a real slot (as a task
process would) and commit it, giving the ExtensionView a batch would pin."""
from __future__ import annotations

from fmplexd.slots import ExtensionView, Slot
from ipc.messages import BackboneInfo
from ipc.shm import MappedRegion, store
from tasklets.adapters import Extension, validate
from testkit.tiny import write_random_head, write_random_lora  # noqa: F401


def commit_extension(ext: Extension, info: BackboneInfo, name: str = "t") -> ExtensionView:
    """Validate, write into a fresh slot through a writable mapping, commit; return the view."""
    validate(ext, info)
    slot = Slot(name, ext.spec, info, generation=1)
    writer = MappedRegion(slot.fd, slot.size, writable=True)
    base = slot.writable_half * slot.half_bytes
    for e in slot.entries:
        store(writer.array(e, base), ext.tensors[e.name], e.dtype)
    slot.commit(slot.writable_half)
    writer.close()
    return slot.active

"""fmplexd's Engine driven in-process, without sockets: the daemon's own objects (Engine, runners,
Scheduler, slots) with tasks whose extensions are written through real slots. For parity tests and
benchmarks that need the forward and the batching exactly as the daemon runs them.

    h = EngineHarness({"smollm2": backbone}, DaemonConfig(...))
    a = h.add_task("a", "smollm2", view)                   # view: testkit.extensions.commit_extension
    h.submit(a, Generate(epoch=a.session, ref=1, prompt=ids, max_tokens=24))
    h.run_until_idle()                                       # -> every Delivery, in order
"""
from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

from fmplexd.engine import Engine
from fmplexd.families.base import Delivery
from fmplexd.slots import ExtensionView
from ipc.messages import ExtensionSpec, Message, TaskConfig


def base_view() -> ExtensionView:
    """A committed view with no extension (the plain backbone)."""
    return ExtensionView(1, ExtensionSpec(), [], [], None, None)


class EngineHarness:
    def __init__(self, backbones: dict, settings, warm_up: bool = True):
        self.engine = Engine(backbones, settings)
        if warm_up:
            self.engine.warm_up()
        self._sessions = itertools.count(1000)

    def add_task(self, name: str, backbone: str, view: ExtensionView | None = None,
                 weight: float = 1.0, queue_limit: int = 10_000, deadline_ms: int = 3_600_000):
        task = SimpleNamespace(name=name, session=next(self._sessions),
                               config=TaskConfig(name=name, owner_uid=0, backbone=backbone,
                                                 weight=weight, queue_limit=queue_limit,
                                                 deadline_ms=deadline_ms),
                               slot=SimpleNamespace(active=view or base_view()))
        self.engine.add_task(task.session, backbone, weight, queue_limit)
        return task

    def submit(self, task, msg: Message, now: float | None = None) -> None:
        self.engine.admit(task, msg, time.monotonic() if now is None else now)

    def step(self) -> list[Delivery] | None:
        """One unit of work (None if there was nothing to run): its deliveries."""
        work, late = self.engine.next_work(time.monotonic())
        if work is None:
            return late or None
        t0 = time.monotonic()
        outputs = self.engine.run(work)
        return late + self.engine.finish(work, outputs, t0, time.monotonic())

    def run_until_idle(self, max_steps: int = 100_000) -> list[Delivery]:
        out: list[Delivery] = []
        for _ in range(max_steps):
            got = self.step()
            if got is None:
                return out
            out += got
        raise RuntimeError(f"still busy after {max_steps} steps")

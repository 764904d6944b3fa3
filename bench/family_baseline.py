"""One task served as its own model instance, for a backbone of any one-forward family: the
one-process-per-task baseline of the mixed-family serving benchmark (bench/serve.py --workload
mixed).

    python -m bench.family_baseline --spec SPEC.toml --backbone PATH --endpoint ipc://PATH
                                    [--threads N]

The process loads its *own private copy* of the backbone (fmplexd.families.load_backbone: the
family's loader, publishing into a region of this process), validates the task's extension and
commits it into a private slot, and runs an engine of its own (fmplexd.engine.Engine with that one
backbone and that one task: the daemon's batching and kernels; each forward takes what is already
queued, up to the budget). In front of it, the task's own pipeline (tasklets.pipelines: the same
pre- and post-processing as a task process) answers the fmplex client protocol on a ZeroMQ ROUTER
(tasklets.endpoint.ClientEndpoint). Prints `ready PID` once it serves; SIGTERM ends it.

So the systems compared differ only in the serving design: one shared engine and backbone copy for
every task (fmplex) or one of each per task (this). Generation (streams) is not served here.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace


@dataclass(slots=True, eq=False)
class LocalTask:
    """The one task (fmplexd.families.base.TaskRef): its config, session and committed slot."""
    name: str
    session: int
    config: object
    slot: object


class LocalSession:
    """The task's session on the in-process engine, as a pipeline sees its daemon session
    (tasklets.pipelines.DaemonCall): `request` queues a message and awaits its Result."""

    def __init__(self, engine, task: LocalTask):
        self.engine, self.entry, self.task = engine, task, task.name
        self.refs = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.wake = asyncio.Event()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="baseline-forward")

    async def request(self, cls: type, **fields):
        from ipc.errors import error_for
        from ipc.messages import Error
        msg = cls(epoch=self.entry.session, ref=next(self.refs), **fields)
        fut = asyncio.get_running_loop().create_future()
        self.engine.admit(self.entry, msg, time.monotonic())        # FmplexError: refused
        self.waiting[msg.ref] = fut
        self.wake.set()
        reply = await fut
        if isinstance(reply, Error):
            raise error_for(reply.code, reply.message)
        return reply

    def stream(self, cls: type, **fields):
        raise NotImplementedError("the per-task baseline serves one-forward families only")

    async def run(self) -> None:
        """The engine loop: next work -> forward (worker thread) -> finish -> deliver."""
        loop = asyncio.get_running_loop()
        while True:
            work, late = self.engine.next_work(time.monotonic())
            self._deliver(late)
            if work is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            t0 = time.monotonic()
            outputs = await loop.run_in_executor(self.pool, self.engine.run, work)
            t1 = time.monotonic()
            self._deliver(self.engine.finish(work, outputs, t0, t1))

    def _deliver(self, deliveries) -> None:
        for d in deliveries:
            fut = self.waiting.pop(d.msg.ref, None)
            if fut is not None and not fut.done():
                fut.set_result(d.msg)


def build(spec_path: str, backbone_path: str):
    """(engine, task, pipeline) of one task on a private copy of its backbone."""
    from fmplexd.config import DaemonConfig
    from fmplexd.engine import Engine
    from fmplexd.families import load_backbone
    from ipc.spec import load_spec
    from tasklets.pipelines import make_pipeline
    from tasklets.process import load_extension
    from testkit.extensions import commit_extension
    spec = load_spec(spec_path)
    backbone = load_backbone(spec.backbone, backbone_path)
    engine = Engine({spec.backbone: backbone}, DaemonConfig())
    engine.warm_up()
    ext = load_extension(spec, backbone.info)
    view = commit_extension(ext, backbone.info, spec.name)
    task = LocalTask(spec.name, 1, spec.task_config(), SimpleNamespace(active=view))
    engine.add_task(task.session, spec.backbone, spec.weight, spec.queue_limit)
    return engine, task, make_pipeline(spec, backbone.info, ext.spec.prompt_tokens), spec


async def serve(args) -> None:
    import zmq.asyncio

    from tasklets.endpoint import ClientEndpoint
    engine, task, pipeline, spec = build(args.spec, args.backbone)
    session = LocalSession(engine, task)

    async def handle(msg, send):
        deadline_ms = getattr(msg, "timeout_ms", 0) or spec.deadline_ms
        return await asyncio.wait_for(pipeline.serve(msg, session, send, deadline_ms),
                                      deadline_ms / 1e3)
    endpoint = ClientEndpoint(zmq.asyncio.Context(), args.endpoint, os.getuid(), handle,
                              pipeline.accepts, max_in_flight=1 << 16)
    endpoint.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    runner = asyncio.create_task(session.run())
    print(f"ready {os.getpid()}", flush=True)
    await stop.wait()
    runner.cancel()
    await endpoint.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--backbone", required=True, help="the backbone's path (or embedded[:KEY])")
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = default")
    args = ap.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from ipc import aio
    aio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

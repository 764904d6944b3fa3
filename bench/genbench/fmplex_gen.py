"""fmplex under the generation workload: a real fmplexd hosting the decoder backbone with one task
process per LoRA task, driven by AsyncClient streams (each request sent at its arrival time; the
first streamed token and the last are timed), while the daemon's KV pool is sampled."""
from __future__ import annotations

import asyncio
import os
import time

from bench.genbench.records import Record
from bench.genbench.workload import GenRequest
from fmplex import AsyncClient
from ipc.errors import FmplexError
from ipc.messages import Deploy, Info
from testkit.launch import DaemonProcess


class FmplexGen:
    name = "fmplex"

    def __init__(self, plan, backbone: str, adapters: list[str], work: str,
                 weights: list[float] | None = None):
        self.plan, self.adapters, self.work = plan, adapters, work
        self.weights = weights or [1.0] * len(adapters)
        config = (f"kv_pool_mb = {plan.kv_pool_mb}\nmax_sequences = {plan.max_sequences}\n"
                  f"batch_target_ms = {plan.batch_target_ms}\nliveness_ms = 10000\n")
        os.makedirs(os.path.join(work, "fmplexd"), exist_ok=True)
        self.daemon = DaemonProcess({"llm": backbone}, config=config,
                                    workdir=os.path.join(work, "fmplexd"), threads=plan.threads)

    def start(self) -> "FmplexGen":
        self.daemon.start(timeout_s=300)
        with self.daemon.client(timeout_s=300) as c:
            for i, (adapter, w) in enumerate(zip(self.adapters, self.weights)):
                path = os.path.join(self.work, f"g{i:03d}.toml")
                with open(path, "w") as f:
                    f.write(f'name = "g{i:03d}"\npipeline = "text-generation"\nbackbone = "llm"\n'
                            f'weight = {w}\nqueue_limit = 100000\ndeadline_ms = 3600000\n'
                            + (f'[extension]\nadapter = "{adapter}"\n' if adapter else ""))
                with open(path) as f:
                    c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=300)
        return self

    def run(self, requests: list[GenRequest], sample_kv: bool = False) -> tuple[list[Record], float, list]:
        """Records in request order, the wall time, and KV samples (used, total, tokens, block)."""
        from ipc import aio
        return aio.run(self._run(requests, sample_kv))

    async def _run(self, requests, sample_kv):
        async with AsyncClient(self.daemon.run_dir, timeout_s=3600) as ac:
            samples, stop = [], asyncio.Event()
            sampler = asyncio.ensure_future(self._sample(ac, samples, stop)) if sample_kv else None
            t0 = time.monotonic()
            records = await asyncio.gather(*(self._one(ac, r, t0) for r in requests))
            wall = time.monotonic() - t0
            stop.set()
            if sampler is not None:
                await sampler
            return list(records), wall, samples

    async def _one(self, ac, r: GenRequest, t0: float) -> Record:
        await asyncio.sleep(max(0.0, t0 + r.t - time.monotonic()))
        rec = Record(r.task, time.monotonic(), prompt_tokens=len(r.ids))
        try:
            async for part in ac.stream(f"g{r.task:03d}", prompt=r.text, max_tokens=r.max_tokens,
                                        ignore_eos=True):
                now = time.monotonic()
                if getattr(part, "token_ids", None) and not rec.first:
                    rec.first = now
                if hasattr(part, "finish_reason"):
                    rec.end, rec.tokens = now, part.completion_tokens
        except FmplexError as e:
            rec.error = e.code.value
        return rec

    async def _sample(self, ac, samples: list, stop: asyncio.Event) -> None:
        while not stop.is_set():
            info = await ac.control(Info(ref=ac.ref()))
            s = info.load[0]
            samples.append((s.kv_blocks_used, s.kv_blocks_total, s.kv_tokens, s.kv_block_tokens,
                            s.sequences))
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    def served(self) -> dict[str, int]:
        return {t.name: t.served_tokens for t in self.daemon.tasks().values()}

    def close(self) -> None:
        self.daemon.cleanup()

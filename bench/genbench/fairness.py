"""Weighted shares of generation under saturation: three tasks of weights 1, 2 and 4, each keeping
`outstanding` requests in flight (equal prompts and lengths; more than the daemon's max_sequences,
so every task stays backlogged), for a window; each task's served
tokens (the scheduler's charge: prompt tokens + 2 per generated token, from `fmplex task list`)
over the window, against its weight's share."""
from __future__ import annotations

import asyncio
import time

WEIGHTS = (1.0, 2.0, 4.0)


async def _keep_busy(ac, task: str, text: str, stop: float, outstanding: int) -> int:
    async def loop():
        n = 0
        while time.monotonic() < stop:
            await ac.generate(task, prompt=text, max_tokens=48, ignore_eos=True)
            n += 1
        return n
    return sum(await asyncio.gather(*(loop() for _ in range(outstanding))))


def weighted_shares(system, window_s: float, outstanding: int, text: str) -> dict:
    from fmplex import AsyncClient
    from ipc import aio

    async def run():
        async with AsyncClient(system.daemon.run_dir, timeout_s=3600) as ac:
            names = [f"g{i:03d}" for i in range(len(WEIGHTS))]
            warm = time.monotonic() + window_s / 4          # reach steady state first
            tasks = [asyncio.ensure_future(_keep_busy(ac, n, text, warm + window_s, outstanding))
                     for n in names]
            await asyncio.sleep(max(0.0, warm - time.monotonic()))
            before = system.served()
            await asyncio.sleep(window_s)
            after = system.served()
            await asyncio.gather(*tasks)
            return {n: after[n] - before[n] for n in names}
    served = aio.run(run())
    total = sum(served.values())
    want = [w / sum(WEIGHTS) for w in WEIGHTS]
    shares = [served[f"g{i:03d}"] / total for i in range(len(WEIGHTS))]
    return {"weights": list(WEIGHTS), "served": served, "shares": shares, "want": want,
            "max_rel_error": max(abs(s - w) / w for s, w in zip(shares, want)),
            "window_s": window_s, "outstanding_per_task": outstanding}

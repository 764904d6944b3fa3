"""The fmplex system under test: the real fmplexd (testkit.launch.DaemonProcess) and one task
process per task, deployed through the control socket by the daemon's supervisor.

Fmplex has the interface every system has for the load driver (bench/servebench/driver.py):
`name`, `await open(timeout_s)`, `await infer(task index, text, timeout_s)`, `await close()`, and
`pids()` (role -> pids, for the PSS measurement); `start()` / `stop()` bracket its life. It also
deploys and removes tasks (the capacity phase grows it) and describes the daemon's set-up. With
several backbones (the mixed-family workload), `await call(task index, msg, timeout_s)` sends any
client request."""
from __future__ import annotations

import asyncio
import re

from bench.servebench.plan import REFS
from bench.servebench.tasks import TaskBank, TaskDef


class Fmplex:
    """The real fmplexd and its supervised task processes, deployed through the control socket."""
    name = "fmplex"

    def __init__(self, bank: TaskBank | None, threads: int = 0,
                 backbones: dict[str, str] | str = "embedded", config: str = ""):
        from testkit.launch import DaemonProcess, short_tmpdir
        self.bank = bank
        self.daemon = DaemonProcess(backbones, config, workdir=short_tmpdir("fmx-bd-"),
                                    threads=threads)
        self.tasks: list[TaskDef] = []
        self.client = None
        self.threads = threads
        from fmplexd.config import load_config
        self.lanes, self.daemon_threads = load_config(self.daemon.config_path).lanes_and_threads()

    def start(self) -> "Fmplex":
        self.daemon.start()
        return self

    async def deploy(self, tasks: list[TaskDef], concurrency: int = 4, attempts: int = 2) -> None:
        """Deploy through the control socket (the daemon's supervisor starts each process and
        answers once it serves). A deploy that fails (e.g. a task process not answered in time
        on a saturated machine) is retried after removing what is left of it; the last failure
        raises."""
        from ipc.errors import FmplexError
        from ipc.messages import Deploy, RemoveTask
        from fmplex.client import AsyncClient
        sem = asyncio.Semaphore(concurrency)
        async with AsyncClient(self.daemon.run_dir, timeout_s=300) as c:
            async def one(t: TaskDef):
                with open(t.spec_path) as f:
                    text = f.read()
                for attempt in range(attempts):
                    try:
                        async with sem:
                            await c.control(Deploy(ref=next(REFS), spec=text,
                                                   spec_path=t.spec_path), timeout_s=150)
                        return
                    except FmplexError:
                        if attempt == attempts - 1:
                            raise
                        try:
                            await c.control(RemoveTask(ref=next(REFS), name=t.name), timeout_s=60)
                        except FmplexError:
                            pass
            await asyncio.gather(*(one(t) for t in tasks))
        self.tasks += tasks

    def remove(self, name: str) -> None:
        """Remove one deployed task (its process stops; self.tasks is the caller's to trim)."""
        from ipc.messages import RemoveTask
        with self.daemon.client() as c:
            c.control(RemoveTask(ref=c.ref(), name=name))

    async def open(self, timeout_s: float) -> None:
        from fmplex.client import AsyncClient
        self.client = AsyncClient(self.daemon.run_dir, timeout_s=timeout_s)

    async def infer(self, task: int, text: str, timeout_s: float):
        return await self.client.infer(self.tasks[task].name, [text], timeout_s=timeout_s)

    async def call(self, task: int, msg, timeout_s: float):
        """Any client request to task `task` (by index); its reply."""
        return await self.client.task_call(self.tasks[task].name, msg, timeout_s)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def pids(self) -> dict[str, list[int]]:
        from bench.common import daemon_helper_pids
        task_pids = [t.pid for t in self.daemon.tasks().values() if t.pid]
        return {"daemon": [self.daemon.proc.pid],
                "zygote": daemon_helper_pids(self.daemon.proc.pid, task_pids), "tasks": task_pids}

    def restarts(self) -> int:
        """Task process restarts the daemon counted (a sign of an unstable run)."""
        return sum(t.restarts for t in self.daemon.tasks().values())

    def describe(self) -> str:
        """serve.json's placement of fmplex: threads, task processes, and the batch sizing."""
        return (f"fmplexd with {self.lanes} executor lane(s) of {self.daemon_threads} torch "
                f"thread(s) each (from its config; by default one lane of one thread per core), "
                f"task processes unpinned (nicer than the daemon, in cgroups where the host "
                f"allows); one shared backbone region; {self._batch_sizing()}")

    def _batch_sizing(self) -> str:
        """The daemon's batch sizing: from the config it runs with (batch_target_ms,
        token_budget) and, where its log says it, the budget it calibrated at start."""
        from fmplexd.config import load_config
        cfg = load_config(self.daemon.config_path)
        if not cfg.batch_target_ms:
            return f"a fixed token budget of {cfg.token_budget} tokens per batch"
        m = re.search(r"([0-9.]+) tokens/s at start, batch budget (\d+) tokens",
                      self.daemon.log_text())
        logged = (f"; its log at start: {m.group(1)} tokens/s, batch budget {m.group(2)} tokens"
                  if m else "")
        return (f"batches sized adaptively (batch_target_ms = {cfg.batch_target_ms}): a token "
                f"budget that takes about {cfg.batch_target_ms} ms of forward at the measured "
                f"throughput, at most token_budget = {cfg.token_budget} tokens{logged}")

    def stop(self) -> None:
        self.daemon.cleanup()

"""The baseline systems: one bench/baseline.py process per task, each its own model instance.

Baselines(name) is "co-located" (every process on all cores, torch's default or the given thread
count), "partitioned" (bench/servebench/placement.py's fixed slices) or "dedicated" (the one
instance of the batch-1 reference). It has the interface every system has for the load driver
(bench/servebench/driver.py): `name`, `open`, `infer(task index, ...)`, `close`, `pids`.
start(tasks) returns once every new process printed `ready`; stop() ends them all (SIGTERM, then
SIGKILL after 15 s) and removes their cgroups and sockets. Each process gets SIGTERM if this one
dies."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from bench.servebench.placement import Placement, cpu_cgroup, partition
from bench.servebench.tasks import TaskDef
from bench.servebench.zmq_client import ZmqClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVING = ("a process per task (bench/baseline.py): fmplexd's Encoder over its private weights with "
           "the LoRA merged, its own dynamic batching without waiting (each forward takes every "
           "request already queued, up to 32), replies over a ZeroMQ ROUTER with the fmplex "
           "client protocol")


class Baselines:
    """One bench/baseline.py process per task: co-located (no placement) or partitioned."""

    def __init__(self, name: str, device: str = "cpu", partition_mode: str = "auto",
                 threads: int = 0, backbone: str = "embedded"):
        from testkit.launch import short_tmpdir
        self.backbone = backbone               # bench/baseline.py --backbone
        self.name, self.device, self.partition_mode = name, device, partition_mode
        self.threads = threads                 # co-located: torch threads (0 = torch's default)
        self.dir = short_tmpdir("fmx-bl-")
        self.procs: list[subprocess.Popen] = []
        self.endpoints: list[str] = []
        self.cgroups: list[str] = []
        self.client = None
        self.placement: dict = {}

    def start(self, tasks: list[TaskDef], timeout_s: float = 300.0) -> "Baselines":
        if self.name == "partitioned":
            places, how = partition(len(tasks), self.device, self.partition_mode)
        else:
            places = [Placement(threads=self.threads) for _ in tasks]
            threads = self.threads or _torch_default_threads()
            how = (f"all cores, {threads} torch thread(s) each" if self.threads else
                   f"all cores, torch's default thread count ({threads} here), no coordination")
            self.placement = self.placement or {"threads_each": threads}
        if "how" not in self.placement:
            self.placement.update(how=how, per_process=[p.describe() for p in places[:4]] +
                                  (["..."] if len(places) > 4 else []))
        first = len(self.procs)
        for t, p in zip(tasks, places):
            self._spawn(t, p)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs[first:]:
            _wait_line(proc, b"ready", deadline)
        return self

    def stop_last(self, k: int) -> None:
        """Stop the k most recently started instances (capacity: back within the budget)."""
        for p in self.procs[-k:]:
            p.terminate()
            p.wait()
            p.stdout.close()
        del self.procs[-k:], self.endpoints[-k:]

    def _spawn(self, t: TaskDef, p: Placement) -> None:
        endpoint = f"ipc://{self.dir}/{t.name}.sock"
        cmd = [sys.executable, "-m", "bench.baseline", "--spec", t.spec_path, "--endpoint", endpoint,
               "--device", self.device, "--threads", str(p.threads), "--backbone", self.backbone]
        if p.cpus:
            cmd += ["--cpus", ",".join(map(str, p.cpus))]
        if p.quota_cpus:
            group = cpu_cgroup(t.name, p.quota_cpus)
            self.cgroups.append(group)
            cmd += ["--cgroup", group]
        if p.mps_percent:
            cmd += ["--mps-percent", str(p.mps_percent)]
        if p.time_slice:
            cmd += ["--time-slice", p.time_slice]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        with open(os.path.join(self.dir, f"{t.name}.log"), "wb") as log:
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                               stderr=log, preexec_fn=_die_with_parent))
        self.endpoints.append(endpoint)

    async def open(self, timeout_s: float) -> None:
        self.client = ZmqClient(self.endpoints)

    async def infer(self, task: int, text: str, timeout_s: float):
        return await self.client.infer(task, text, timeout_s)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def pids(self) -> dict[str, list[int]]:
        return {"instances": [p.pid for p in self.procs]}

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
        for g in self.cgroups:
            try:
                os.rmdir(g)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        self.procs, self.cgroups = [], []


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark process dies (PR_SET_PDEATHSIG)."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _torch_default_threads() -> int:
    """What torch.get_num_threads() gives a fresh process here (physical cores)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip() or 0)


def _wait_line(proc: subprocess.Popen, text: bytes, deadline: float) -> None:
    import select
    buf = b""
    fd = proc.stdout.fileno()
    while text not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"baseline {proc.pid} not ready")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"baseline {proc.pid} exited with {proc.wait()}")
            buf += chunk

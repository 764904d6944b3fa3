"""Where a baseline instance runs: Placement (cores, torch threads, CFS quota, MPS percentage or
GPU time slice) and partition(), the fixed slices of the partitioned baseline.

partition(n, device, mode) returns one Placement per process and a sentence saying how the machine
was divided (it goes into serve.json as is). The cgroup-v1 quota is only used where the `cpu`
controller is writable here; bench/servebench/baselines.py creates and removes the groups."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placement:
    cpus: tuple[int, ...] = ()
    threads: int = 0
    quota_cpus: float = 0.0          # CFS quota in CPUs (0 = none)
    mps_percent: int = 0
    time_slice: str = ""             # I/N/MS

    def describe(self) -> str:
        parts = [f"cores {','.join(map(str, self.cpus))}" if self.cpus else "all cores",
                 f"{self.threads} thread(s)" if self.threads else "torch default threads"]
        if self.quota_cpus:
            parts.append(f"CFS quota {self.quota_cpus:.3g} CPU")
        if self.mps_percent:
            parts.append(f"MPS {self.mps_percent}%")
        if self.time_slice:
            parts.append(f"time slice {self.time_slice}")
        return ", ".join(parts)


CGROUP_CPU = "/sys/fs/cgroup/cpu"
CFS_PERIOD_US = 100_000


def cgroup_cpu_writable() -> bool:
    probe = os.path.join(CGROUP_CPU, f"fmplex-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
        return True
    except OSError:
        return False


def mps_running() -> bool:
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


def partition(n: int, device: str, mode: str) -> tuple[list[Placement], str]:
    """Fixed slices for n processes, and a sentence saying how."""
    ncpu = len(os.sched_getaffinity(0))
    if device != "cpu":
        if mps_running():
            pct = max(1, 100 // n)
            return [Placement(mps_percent=pct) for _ in range(n)], \
                f"GPU: MPS active-thread percentage {pct}% per process"
        return [Placement(time_slice=f"{i}/{n}/10") for i in range(n)], \
            f"GPU: no MPS daemon running; equal time slices of 10 ms (slot i of {n})"
    cpus = sorted(os.sched_getaffinity(0))
    if n <= ncpu:
        per = ncpu // n
        places = [Placement(tuple(cpus[i * per:(i + 1) * per]), per) for i in range(n)]
        return places, f"CPU: {per} pinned core(s) per process, torch threads = {per}"
    quota = mode in ("auto", "quota") and cgroup_cpu_writable()
    if mode == "quota" and not quota:
        raise SystemExit("--partition quota: no writable cgroup-v1 cpu controller here")
    share = ncpu / n
    places = [Placement((cpus[i % ncpu],), 1, share if quota else 0.0) for i in range(n)]
    how = (f"CPU: {n} processes round-robin over {ncpu} cores (process i on core i mod {ncpu}), "
           f"1 torch thread each")
    how += (f", each capped by a CFS quota of {share:.3g} CPU (cgroup v1 cpu.cfs_quota_us = "
            f"{int(share * CFS_PERIOD_US)} per {CFS_PERIOD_US} us period): a fixed slice"
            if quota else "; no CPU quota (cores time-shared by the kernel among the processes "
            "pinned to them, so a busy process may use its idle neighbours' share)")
    return places, how


def cpu_cgroup(name: str, quota_cpus: float) -> str:
    """Create a cgroup-v1 `cpu` group capped at quota_cpus CPUs (a process joins it by writing
    its pid to cgroup.procs); the caller removes it (os.rmdir) once its processes are gone."""
    group = os.path.join(CGROUP_CPU, f"fmplex-bench-{os.getpid()}-{name}")
    os.makedirs(group, exist_ok=True)
    with open(os.path.join(group, "cpu.cfs_period_us"), "w") as f:
        f.write(str(CFS_PERIOD_US))
    with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as f:
        f.write(str(max(1000, int(quota_cpus * CFS_PERIOD_US))))
    return group


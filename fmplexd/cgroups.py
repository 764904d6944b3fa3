"""Per-task cgroups: each supervised task process gets its own CPU weight and memory limit.

    tree = TaskCgroups.detect(mode)               # None where this host gives us nothing to manage
    procs = tree.place(name, weight, memory_mb)   # make (or update) the task's cgroup: the
                                                  # cgroup.procs files its process must join
    join(procs, pid)                              # move a process there (0 = the caller itself)
    tree.release(name)                            # remove the task's cgroup (its process exited)
    tree.close()                                  # remove what place() made

Flat: a task's cgroup sits beside the daemon, not inside a group of all tasks. In a nested group the
kernel splits the group's weight over the CPUs by each CPU's share of the group's load, so a task
process that wakes for one request, beside a flooding sibling that keeps the group loaded, gets a
few percent of an already small weight and waits tens of milliseconds per wake-up while the
daemon's lanes keep the CPUs busy (bench/fairness: the quiet tasks' reply path, forward end to
client, p99 120-180 ms nested, 20 ms flat). Beside the daemon, a task's cgroup weighs as much as
one of the daemon's threads per unit of task weight; a flooding tenant is held to that share (and
its admission room, fmplexd.engine), while a quiet one wakes at once (with the short slice of
fmplexd.cpu_slice).

Two hierarchies, one contract:
  v2 (unified): the daemon's own cgroup must be delegated to it (systemd `Delegate=yes`: the
     directory, its cgroup.procs and cgroup.subtree_control writable by the daemon). A cgroup with
     children holds no processes, so the daemon first moves its own processes (and the zygote)
     into `<own>/daemon` (cpu.weight = 100 x (cores + 1): as many weight-1 tasks as its lanes and
     event loop). Each task: `<own>/task:<name>`, cpu.weight = 100 x its weight (1 .. 10000) and
     memory.max = memory_mb MiB ("max" for 0).
  v1 (legacy: separate cpu and memory hierarchies, e.g. a container with a writable cgroupfs):
     `<own cpu>/fmplexd-<pid>:<name>` with cpu.shares = 1024 x weight (2 .. 262144), beside the
     daemon's threads (1024 each), and `<own memory>/fmplexd-<pid>:<name>` with
     memory.limit_in_bytes. Groups left by a daemon that died (`fmplexd-<pid>` or
     `fmplexd-<pid>:...` of a dead pid, empty) are removed at start.

mode (config `task_cgroups`): "auto" (v2 if delegated, else v1 if writable, else none), "v2", "v1",
or "off". Nothing here raises for a host that cannot do it: detect() returns None and logs why;
a failure to place one task is logged and that task runs without (the daemon keeps serving).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("fmplexd.cgroups")
MOUNTINFO = "/proc/self/mountinfo"
TASK_PREFIX_V2 = "task:"
MODES = ("auto", "v2", "v1", "off")


class TaskCgroups:
    version = 0

    @staticmethod
    def detect(mode: str = "auto") -> "TaskCgroups | None":
        if mode not in MODES:
            raise ValueError(f"task_cgroups must be one of {MODES}, not {mode!r}")
        if mode == "off":
            return None
        mounts, own = mounts_by_controller(), process_cgroups()
        tried = []
        for version, cls in (("v2", _V2), ("v1", _V1)):
            if mode not in ("auto", version):
                continue
            why = cls.usable(mounts, own)
            if why is None:
                try:
                    return cls.create(mounts, own)
                except OSError as e:
                    why = f"setting it up failed: {e}"
            tried.append(f"{version}: {why}")
        log.info("task processes run without cgroups of their own (%s)", "; ".join(tried))
        return None

    def place(self, name: str, weight: float, memory_mb: int) -> list[str]:
        raise NotImplementedError

    def release(self, name: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class _V2(TaskCgroups):
    version = 2

    @classmethod
    def create(cls, mounts: dict, own: dict) -> "_V2":
        return cls(os.path.join(mounts["cgroup2"], own[""].lstrip("/")))

    def __init__(self, own: str):
        self.own = own
        daemon = os.path.join(own, "daemon")
        os.makedirs(daemon, exist_ok=True)
        with open(os.path.join(own, "cgroup.procs")) as f:       # the daemon, its threads' group
            pids = [p for p in f.read().split() if p]
        for pid in pids:                                        # and the zygote, if started
            _write(os.path.join(daemon, "cgroup.procs"), pid, missing_ok=True)
        _write(os.path.join(own, "cgroup.subtree_control"), "+cpu +memory")
        _write(os.path.join(daemon, "cpu.weight"), str(daemon_weight()))

    @staticmethod
    def usable(mounts: dict, own: dict) -> str | None:
        if "cgroup2" not in mounts or "" not in own:
            return "no unified hierarchy"
        path = os.path.join(mounts["cgroup2"], own[""].lstrip("/"))
        try:
            with open(os.path.join(path, "cgroup.controllers")) as f:
                controllers = set(f.read().split())
        except OSError as e:
            return f"cannot read {path}/cgroup.controllers ({e.strerror})"
        if not {"cpu", "memory"} <= controllers:
            return f"cpu and memory are not delegated to {path} (it has {sorted(controllers)})"
        for name in ("cgroup.procs", "cgroup.subtree_control"):
            if not os.access(os.path.join(path, name), os.W_OK):
                return f"{path}/{name} is not writable (Delegate=yes in the unit?)"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
        return None

    def place(self, name: str, weight: float, memory_mb: int) -> list[str]:
        path = os.path.join(self.own, TASK_PREFIX_V2 + name)
        os.makedirs(path, exist_ok=True)
        _write(os.path.join(path, "cpu.weight"), str(cpu_weight(weight)))
        _write(os.path.join(path, "memory.max"), str(memory_mb << 20) if memory_mb else "max")
        return [os.path.join(path, "cgroup.procs")]

    def release(self, name: str) -> None:
        _rmdir(os.path.join(self.own, TASK_PREFIX_V2 + name))

    def close(self) -> None:
        _rmdir_prefixed(self.own, TASK_PREFIX_V2)

    def describe(self) -> str:
        return f"cgroup v2: {self.own}/{TASK_PREFIX_V2}<task>"


class _V1(TaskCgroups):
    version = 1
    CONTROLLERS = ("cpu", "memory")

    @classmethod
    def create(cls, mounts: dict, own: dict) -> "_V1":
        return cls({c: os.path.join(mounts[c], own[c].lstrip("/")) for c in cls.CONTROLLERS})

    def __init__(self, own: dict[str, str]):
        for c, path in own.items():            # groups of earlier daemons that died
            for d in _subdirs(path):
                if d.startswith("fmplexd-") and not _alive(d[len("fmplexd-"):].split(":", 1)[0]):
                    for name in _subdirs(os.path.join(path, d)):    # (the older, nested layout)
                        _rmdir(os.path.join(path, d, name))
                    _rmdir(os.path.join(path, d))
        self.own = own
        self.prefix = f"fmplexd-{os.getpid()}:"

    @staticmethod
    def usable(mounts: dict, own: dict) -> str | None:
        for c in _V1.CONTROLLERS:
            if c not in mounts or c not in own:
                return f"no {c} hierarchy"
            path = os.path.join(mounts[c], own[c].lstrip("/"))
            if not os.access(path, os.W_OK):
                return f"{path} is not writable"
        return None

    def place(self, name: str, weight: float, memory_mb: int) -> list[str]:
        cpu = os.path.join(self.own["cpu"], self.prefix + name)
        mem = os.path.join(self.own["memory"], self.prefix + name)
        os.makedirs(cpu, exist_ok=True)
        os.makedirs(mem, exist_ok=True)
        _write(os.path.join(cpu, "cpu.shares"), str(cpu_shares(weight)))
        _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_mb << 20) if memory_mb
               else "-1")
        return [os.path.join(cpu, "cgroup.procs"), os.path.join(mem, "cgroup.procs")]

    def release(self, name: str) -> None:
        for path in self.own.values():
            _rmdir(os.path.join(path, self.prefix + name))

    def close(self) -> None:
        for path in self.own.values():
            _rmdir_prefixed(path, self.prefix)

    def describe(self) -> str:
        return (f"cgroup v1: {self.own['cpu']}/{self.prefix}<task> and "
                f"{self.own['memory']}/{self.prefix}<task>")


def daemon_weight() -> int:
    """cgroup v2 cpu.weight of the daemon's own group: one weight-1 task per core, plus one."""
    return min(10000, 100 * (len(os.sched_getaffinity(0)) + 1))


def cpu_weight(weight: float) -> int:
    """cgroup v2 cpu.weight of a task of fair-share `weight` (1.0 -> 100, the default)."""
    return max(1, min(10000, round(100 * weight)))


def cpu_shares(weight: float) -> int:
    """cgroup v1 cpu.shares of a task of fair-share `weight` (1.0 -> 1024, the default)."""
    return max(2, min(262144, round(1024 * weight)))


def join(procs: list[str], pid: int = 0) -> None:
    """Move process `pid` (0: the calling process) into the cgroups whose cgroup.procs are given.
    Raises OSError."""
    for path in procs:
        _write(path, str(pid))


# -- internals -------------------------------------------------------------------------------

def mounts_by_controller() -> dict[str, str]:
    """Mount point per v1 controller name, and of the unified hierarchy as "cgroup2"."""
    out: dict[str, str] = {}
    try:
        with open(MOUNTINFO) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        point, fstype, options = fields[4], rest[0], rest[2].split(",")
        if fstype == "cgroup2":
            out.setdefault("cgroup2", point)
        elif fstype == "cgroup":
            for opt in options:
                out.setdefault(opt, point)
    return out


def process_cgroups(pid: int | str = "self") -> dict[str, str]:
    """A process's cgroup path (this one's by default) per v1 controller, and in the unified
    hierarchy under ""."""
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _write(path: str, value: str, missing_ok: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except ProcessLookupError:
        if not missing_ok:
            raise


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:                    # EBUSY: a process still in it
        log.warning("cannot remove cgroup %s: %s", path, e.strerror)


def _rmdir_prefixed(parent: str, prefix: str) -> None:
    """Remove the cgroups directly under `parent` whose names start with `prefix` (the tasks'
    groups this daemon placed beside its own)."""
    for d in _subdirs(parent):
        if d.startswith(prefix):
            _rmdir(os.path.join(parent, d))


def _subdirs(path: str) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _alive(pid: str) -> bool:
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")

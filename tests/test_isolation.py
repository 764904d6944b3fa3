"""CPU and memory isolation of tenants (fmplexd.supervisor, fmplexd.cgroups), on real processes.

Every supervised task process runs `task_nice` nicer than the daemon, every one of its threads,
whether forked by the zygote or exec'd. Where this host lets the daemon manage cgroups (v2
delegated, or a writable v1 hierarchy), each task process sits in a cgroup of its own whose CPU
weight follows the task's weight and whose memory limit is its spec's memory_mb; the cgroup goes
when the task is removed and the daemon's group when the daemon stops. Where the host does not,
those tests skip and say why.
"""
from __future__ import annotations

import os
import time

import pytest

from fmplexd.cgroups import TaskCgroups, cpu_shares, cpu_weight, mounts_by_controller
from ipc.messages import Deploy, ListTasks, RemoveTask
from testkit.launch import Daemon, short_tmpdir, write_spec


def deploy(c, specs: str, name: str, body: str) -> int:
    """Deploy and return the task process's pid."""
    path = write_spec(specs, name, body)
    with open(path) as f:
        c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)
    return {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}[name].pid


def nice_of_threads(pid: int) -> set[int]:
    """The nice value of every thread of `pid` (field 19 of /proc/PID/task/TID/stat)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            out.add(int(f.read().rsplit(")", 1)[1].split()[16]))
    return out


def cgroup_paths(pid: int) -> dict[str, str]:
    """Controller ("" for v2) -> the cgroup path of `pid`."""
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f.read().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


@pytest.mark.parametrize("zygote", [True, False], ids=["forked", "execed"])
def test_task_processes_run_nicer_than_the_daemon(tiny_bert, zygote):
    d = Daemon(tiny_bert, config=f"task_nice = 7\ntask_zygote = {str(zygote).lower()}\n"
                                 "task_cgroups = \"off\"").start()
    specs = short_tmpdir("fmx-nice-")
    try:
        with d.client() as c:
            pid = deploy(c, specs, "emb", 'pipeline = "text-embedding"')
            assert c.infer("emb", ["still serves"]).embeddings.shape == (1, 32)
            base = nice_of_threads(d.proc.pid)
            assert len(base) == 1
            want = min(19, base.pop() + 7)
            assert nice_of_threads(pid) == {want}          # every thread, zmq's included
    finally:
        d.cleanup()


def test_tasks_get_cgroups_with_their_weight_and_memory_limit(tiny_bert):
    probe = TaskCgroups.detect("auto")
    if probe is None:
        pytest.skip("this host gives the daemon no cgroups to manage (see fmplexd.cgroups' log "
                    "line: v2 needs Delegate=yes, v1 a writable cpu and memory hierarchy)")
    probe.close()
    d = Daemon(tiny_bert, config='task_cgroups = "auto"').start()
    specs = short_tmpdir("fmx-cg-")
    try:
        with d.client() as c:
            heavy = deploy(c, specs, "heavy", 'pipeline = "text-embedding"\nweight = 2.0\n'
                                              "memory_mb = 300")
            light = deploy(c, specs, "light", 'pipeline = "text-embedding"\nweight = 0.5')
            assert c.infer("heavy", ["serves"]).embeddings.shape == (1, 32)
            mounts = mounts_by_controller()
            daemon_cg, heavy_cg, light_cg = (cgroup_paths(p) for p in (d.proc.pid, heavy, light))
            if probe.version == 1:
                cpu = os.path.join(mounts["cpu"], heavy_cg["cpu"].lstrip("/"))
                mem = os.path.join(mounts["memory"], heavy_cg["memory"].lstrip("/"))
                name = f"fmplexd-{d.proc.pid}:heavy"
                assert os.path.basename(cpu) == name == os.path.basename(mem)
                # flat: beside the daemon's own cgroup, not under a group of all tasks
                assert os.path.dirname(heavy_cg["cpu"]) == os.path.normpath(daemon_cg["cpu"])
                assert read(cpu, "cpu.shares") == str(cpu_shares(2.0)) == "2048"
                assert read(mem, "memory.limit_in_bytes") == str(300 << 20)
                light_cpu = os.path.join(mounts["cpu"], light_cg["cpu"].lstrip("/"))
                assert read(light_cpu, "cpu.shares") == str(cpu_shares(0.5)) == "512"
                assert heavy_cg["cpu"] != daemon_cg["cpu"]
                own, light_own = cpu, light_cpu
            else:
                cg = os.path.join(mounts["cgroup2"], heavy_cg[""].lstrip("/"))
                assert read(cg, "cpu.weight") == str(cpu_weight(2.0)) == "200"
                assert read(cg, "memory.max") == str(300 << 20)
                light_v2 = os.path.join(mounts["cgroup2"], light_cg[""].lstrip("/"))
                assert read(light_v2, "cpu.weight") == "50"
                assert daemon_cg[""].endswith("/daemon")
                assert os.path.basename(cg) == "task:heavy"
                assert os.path.dirname(heavy_cg[""]) == os.path.dirname(daemon_cg[""])
                own, light_own = cg, light_v2
            assert str(heavy) in read(own, "cgroup.procs").split()
            c.control(RemoveTask(ref=c.ref(), name="heavy"), timeout_s=60)
            assert _gone(own), "the removed task's cgroup is left"
            assert c.infer("light", ["still serves"]).embeddings.shape == (1, 32)
            assert os.path.isdir(light_own)
        d.close()
        assert _gone(light_own), "a task's cgroup is left after the daemon stopped"
    finally:
        d.cleanup()


def test_daemon_and_task_processes_get_the_latency_slice(tiny_bert):
    """latency_slice_us reaches every thread of the daemon and of its task processes (inherited
    from the daemon's main thread); 0 leaves the kernel's default."""
    from fmplexd.cpu_slice import slice_us
    try:
        default = slice_us()
    except OSError as e:
        pytest.skip(f"no sched_getattr here: {e}")
    specs = short_tmpdir("fmx-slice-")
    for setting, want in ((250, 250.0), (0, default)):
        d = Daemon(tiny_bert, config=f"latency_slice_us = {setting}").start()
        try:
            with d.client() as c:
                pid = deploy(c, specs, "emb", 'pipeline = "text-embedding"')
                assert c.infer("emb", ["served"]).embeddings.shape == (1, 32)
                for p in (d.proc.pid, pid):
                    slices = {slice_us(int(t)) for t in os.listdir(f"/proc/{p}/task")}
                    assert slices == {want}, (setting, p, slices)
        finally:
            d.cleanup()


def read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as f:
        return f.read().strip()


def _gone(path: str, timeout_s: float = 30.0) -> bool:
    """Wait for the cgroup's removal (after the supervisor reaped the task's process; cgroupfs
    offers no event for it on v1), up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True

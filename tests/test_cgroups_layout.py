"""The layout fmplexd.cgroups makes, checked on a stand-in directory tree (no kernel involved).

tests/test_isolation.py checks the real thing, but only for the hierarchy this host has (v1 here);
these check both layouts' paths and values: each task's cgroup beside the daemon's (not inside a
group of all tasks), its cpu weight from the task's weight, its memory limit from the spec, and the
daemon's own v2 group. A directory tree is not a cgroupfs: removal is not checked here (a real
cgroup directory holds its control files yet can be removed; a plain one cannot).
"""
from __future__ import annotations

import os

from fmplexd import cgroups
from fmplexd.cgroups import _V1, _V2, cpu_shares, cpu_weight, daemon_weight


def read(*parts: str) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read()


def delegated_v2(root: str) -> str:
    """A stand-in for a delegated v2 cgroup holding this process."""
    own = os.path.join(root, "fmplexd.service")
    os.makedirs(own)
    for name, text in (("cgroup.controllers", "cpu memory pids"), ("cgroup.procs", f"{os.getpid()}\n"),
                       ("cgroup.subtree_control", "")):
        with open(os.path.join(own, name), "w") as f:
            f.write(text)
    return own


def test_v2_tasks_sit_beside_the_daemon(tmp_path):
    own = delegated_v2(str(tmp_path))
    assert _V2.usable({"cgroup2": str(tmp_path)}, {"": "/fmplexd.service"}) is None
    tree = _V2(own)
    assert read(own, "daemon", "cgroup.procs") == str(os.getpid())
    assert read(own, "daemon", "cpu.weight") == str(daemon_weight())
    assert read(own, "cgroup.subtree_control") == "+cpu +memory"
    procs = tree.place("emb.v2", 2.5, 300)
    assert procs == [os.path.join(own, "task:emb.v2", "cgroup.procs")]
    assert read(own, "task:emb.v2", "cpu.weight") == str(cpu_weight(2.5)) == "250"
    assert read(own, "task:emb.v2", "memory.max") == str(300 << 20)
    tree.place("light", 1.0, 0)
    assert read(own, "task:light", "memory.max") == "max"
    assert not os.path.exists(os.path.join(own, "tasks")), "no group of all tasks"


def test_v1_tasks_sit_beside_the_daemon_in_both_hierarchies(tmp_path):
    own = {c: str(tmp_path / c / "parent") for c in ("cpu", "memory")}
    for path in own.values():
        os.makedirs(path)
    tree = _V1(own)
    prefix = f"fmplexd-{os.getpid()}:"
    procs = tree.place("emb", 2.0, 64)
    assert procs == [os.path.join(own["cpu"], prefix + "emb", "cgroup.procs"),
                     os.path.join(own["memory"], prefix + "emb", "cgroup.procs")]
    assert read(own["cpu"], prefix + "emb", "cpu.shares") == str(cpu_shares(2.0)) == "2048"
    assert read(own["memory"], prefix + "emb", "memory.limit_in_bytes") == str(64 << 20)
    assert sorted(os.listdir(own["cpu"])) == [prefix + "emb"], "nothing nested, no group of all"


def test_v1_removes_the_empty_groups_of_dead_daemons(tmp_path, monkeypatch):
    own = {c: str(tmp_path / c) for c in ("cpu", "memory")}
    dead, live = "4194321", "4194322"
    for path in own.values():
        os.makedirs(os.path.join(path, f"fmplexd-{dead}:old"))          # this layout
        os.makedirs(os.path.join(path, f"fmplexd-{dead}", "older"))     # the nested one before it
        os.makedirs(os.path.join(path, f"fmplexd-{live}:busy"))         # a running daemon's
    monkeypatch.setattr(cgroups, "_alive", lambda pid: pid == live)
    _V1(own)
    for path in own.values():
        assert sorted(os.listdir(path)) == [f"fmplexd-{live}:busy"]

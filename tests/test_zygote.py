"""The task zygote (tasklets/zygote.py, fmplexd/task_zygote.py): supervised task processes are
forked from one pre-imported process and share its pages; each is still its own process (own
session, name, fault domain); a dead zygote loses no task, and a task that dies after its zygote
is still noticed and restarted (by pidfd, through a new zygote). With `task_zygote = false` the
supervisor execs each task instead."""
import os
import signal
import socket
import subprocess
import sys

import msgpack
import psutil
import pytest

from ipc.messages import Deploy, Health, ListTasks
from testkit.launch import REPO, Daemon, short_tmpdir, write_spec

MB = 1 << 20


def deploy(d, specs, names):
    with d.client() as c:
        for name in names:
            path = write_spec(specs, name, 'pipeline = "text-embedding"')
            with open(path) as f:
                c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)


def pids(c) -> dict[str, int]:
    return {t.name: t.pid for t in c.control(ListTasks(ref=c.ref())).tasks}


def shared_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) * 1024 for k in ("Shared_Clean", "Shared_Dirty"))


@pytest.fixture
def world(tiny_bert):
    d = Daemon(tiny_bert).start()
    specs = short_tmpdir("fmx-zyg-")
    deploy(d, specs, ["z1", "z2"])
    yield d
    d.cleanup()


def test_supervised_tasks_are_forked_by_the_zygote_and_share_its_pages(world):
    with world.client() as c:
        p = pids(c)
        tasks = [psutil.Process(p[n]) for n in ("z1", "z2")]
        zygote = tasks[0].parent()
        assert tasks[1].parent().pid == zygote.pid != world.proc.pid
        assert "tasklets.zygote" in " ".join(zygote.cmdline())
        assert zygote.parent().pid == world.proc.pid
        assert [t.name() for t in tasks] == ["fmplex-task z1", "fmplex-task z2"]
        assert len({os.getsid(t.pid) for t in tasks} | {os.getsid(zygote.pid)}) == 3
        for t in tasks:                          # the zygote's imports stay shared copy-on-write
            assert shared_bytes(t.pid) > 10 * MB, shared_bytes(t.pid)
        assert c.infer("z1", ["forked"]).embeddings.shape == (1, 32)
        assert c.infer("z2", ["forked"]).embeddings.shape == (1, 32)


def test_a_dead_zygote_loses_no_task_and_deaths_are_still_noticed(world):
    with world.client() as c:
        p = pids(c)
        zygote = psutil.Process(p["z1"]).parent()
        zygote.kill()
        zygote.wait(10)
        for name in ("z1", "z2"):                # its children live on and serve
            assert c.infer(name, ["orphaned"]).embeddings.shape == (1, 32)
        os.kill(p["z1"], signal.SIGKILL)         # a death the zygote can no longer report
        h = c.control(Health(ref=c.ref(), name="z1", wait_ms=30_000, not_pid=p["z1"]),
                      timeout_s=35)
        assert h.ready, h.detail
        new = pids(c)
        assert new["z1"] != p["z1"] and new["z2"] == p["z2"]
        parent = psutil.Process(new["z1"]).parent()       # forked by a new zygote
        assert parent.pid != zygote.pid and "tasklets.zygote" in " ".join(parent.cmdline())
        assert c.infer("z1", ["restarted"]).embeddings.shape == (1, 32)
        assert c.infer("z2", ["untouched"]).embeddings.shape == (1, 32)


def test_without_the_zygote_each_task_is_execd_by_the_daemon(tiny_bert):
    d = Daemon(tiny_bert, config="task_zygote = false").start()
    try:
        deploy(d, short_tmpdir("fmx-zyg-"), ["plain"])
        with d.client() as c:
            task = psutil.Process(pids(c)["plain"])
            assert task.parent().pid == d.proc.pid
            assert task.cmdline()[1:3] == ["-m", "tasklets"]
            assert c.infer("plain", ["exec'd"]).embeddings.shape == (1, 32)
    finally:
        d.cleanup()


def test_the_zygote_answers_malformed_requests_and_exits_on_eof():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-m", "tasklets.zygote", "--fd", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], cwd=REPO)
    theirs.close()
    ours.settimeout(60)

    def ask(data: bytes) -> dict:
        ours.send(data)
        return msgpack.unpackb(ours.recv(1 << 16))
    try:
        ready = msgpack.unpackb(ours.recv(1 << 16))                   # the typed wire (ipc/)
        assert ready == {"type": "zygote_ready", "pid": proc.pid}
        reply = ask(msgpack.packb({"type": "spawn", "ref": 7}))       # fields missing
        assert reply["type"] == "error" and reply["ref"] == 7
        assert reply["code"] == "bad_message" and "missing" in reply["message"]
        reply = ask(b"\xc1")                                          # not msgpack at all
        assert reply["type"] == "error" and reply["ref"] == 0         # (not the last request's)
        assert reply["code"] == "bad_frame"
        reply = ask(msgpack.packb({"type": "reboot", "ref": 8}))
        assert (reply["ref"], reply["code"]) == (8, "unknown_type")
        reply = ask(msgpack.packb({"type": "spawned", "ref": 9, "pid": 1}))  # not a request
        assert (reply["ref"], reply["code"]) == (9, "unexpected")
        reply = ask(msgpack.packb({"type": "spawn", "ref": 10, "name": "t", "spec": "/x.toml",
                                   "log": "/nonexistent-dir/t.log", "env": {}}))
        assert (reply["ref"], reply["code"]) == (10, "internal")      # a spawn that cannot fork
        assert "FileNotFoundError" in reply["message"]
    finally:
        ours.close()                                                  # EOF: the zygote exits
        proc.wait(30)
    assert proc.returncode == 0

"""Crash isolation: a task that dies (kill -9, segfault, exit), raises in its pipeline or hangs is
noticed, restarted with backoff by the supervisor, and its clients get typed errors, never a hang;
other tasks keep serving correct outputs. The daemon drains on SIGTERM and tasks started by
someone else re-register by themselves after a daemon restart."""
import os
import signal
import threading
import time

import numpy as np
import pytest

from ipc.errors import (DaemonUnavailable, ErrorCode, FmplexError, RequestTimeout,
                        TaskUnavailable)
from ipc.messages import Deploy, Health, ListTasks, TaskState
from testkit.faults import fault_env
from testkit.launch import Daemon, TaskProc, Traffic, short_tmpdir, wait_notify, write_spec

FAULTS = "raise=RAISE,segfault=SEGV,hang=HANG,exit=EXIT"


@pytest.fixture(scope="module")
def env(tiny_bert):
    d = Daemon(tiny_bert, env=fault_env(FAULTS)).start()
    specs = short_tmpdir("fmx-fault-")
    with d.client() as c:
        for name in ("victim", "bystander"):
            path = write_spec(specs, name, 'pipeline = "text-embedding"')
            with open(path) as f:
                c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)
    yield d
    d.cleanup()


def stats(c, name):
    return {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}[name]


def wait_ready(c, name, timeout_s=30.0, not_pid=0):
    """Long-poll until the task serves (with a pid other than `not_pid`: restarted)."""
    h = c.control(Health(ref=c.ref(), name=name, wait_ms=int(timeout_s * 1000), not_pid=not_pid),
                  timeout_s=timeout_s + 5)
    assert h.ready, h.detail


def reference(c):
    return c.infer("bystander", ["the bystander's own input"]).embeddings


def check_isolated(d, c, fault_input, expect_error, restarted=True):
    """Trigger a fault in `victim` while `bystander` serves under traffic."""
    before = stats(c, "victim")
    want = reference(c)
    with Traffic(d.run_dir, ["bystander"]) as traffic:
        t0 = time.monotonic()
        with pytest.raises(expect_error):
            c.infer("victim", [fault_input], timeout_s=20)
        failed_after = time.monotonic() - t0
        wait_ready(c, "victim", not_pid=before.pid if restarted else 0)
    assert not traffic.failed["bystander"] and traffic.ok["bystander"]
    assert np.allclose(reference(c), want, atol=1e-5)          # its outputs stay correct
    after = stats(c, "victim")
    assert c.infer("victim", ["alive again"]).embeddings.shape == (1, 32)
    return before, after, failed_after


def test_pipeline_exception_is_a_typed_error_and_the_task_lives_on(env):
    with env.client() as c:
        before, after, _ = check_isolated(env, c, "RAISE", FmplexError, restarted=False)
        assert after.restarts == before.restarts and after.pid == before.pid
        with pytest.raises(FmplexError) as e:
            c.infer("victim", ["RAISE"])
        assert e.value.code is ErrorCode.INTERNAL and "injected" in e.value.message


@pytest.mark.parametrize("trigger", ["SEGV", "EXIT"])
def test_crashing_task_is_restarted_and_its_client_gets_task_unavailable(env, trigger):
    with env.client() as c:
        before, after, failed_after = check_isolated(env, c, trigger, TaskUnavailable)
    assert after.restarts == before.restarts + 1 and after.pid != before.pid
    assert failed_after < 5.0           # at once, not at the 20 s deadline


def test_kill_9_is_noticed_and_restarted(env):
    with env.client() as c:
        victim = stats(c, "victim")
        os.kill(victim.pid, signal.SIGKILL)
        wait_ready(c, "victim", not_pid=victim.pid)
        after = stats(c, "victim")
    assert after.restarts == victim.restarts + 1 and after.state is TaskState.READY
    assert after.pid != victim.pid


def test_hung_task_is_declared_dead_killed_and_restarted(env):
    with env.client() as c:
        before, after, failed_after = check_isolated(env, c, "HANG", TaskUnavailable)
    assert after.restarts == before.restarts + 1 and after.pid != before.pid
    assert failed_after < 5.0           # liveness 800 ms + kill, not the 20 s deadline


def test_sigterm_drains_in_flight_work_and_exits_0(tiny_bert):
    d = Daemon(tiny_bert).start()
    try:
        specs = short_tmpdir("fmx-drain-")
        task = TaskProc(write_spec(specs, "t", 'pipeline = "text-embedding"'), d.run_dir).start()
        outcomes, lock, first_ok = [], threading.Lock(), threading.Event()

        def client():
            with d.client(timeout_s=20) as c:
                for _ in range(30):
                    try:
                        c.infer("t", ["drain me"] * 8)
                        r = "ok"
                        first_ok.set()
                    except (DaemonUnavailable, TaskUnavailable) as e:
                        r = e.code.value
                    except RequestTimeout:
                        r = "HUNG"
                    with lock:
                        outcomes.append(r)
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        assert first_ok.wait(30)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        for t in threads:
            t.join(60)
        assert any(b"STOPPING=1" in n for n in wait_notify(d.notify, b"STOPPING=1", 5))
        assert "HUNG" not in outcomes and len(outcomes) == 120
        assert "ok" in outcomes
        task.wait_for(b"daemon lost", 10)      # the task was told, and is reconnecting
    finally:
        task.stop()
        d.cleanup()


def test_daemon_restart_tasks_reregister_by_themselves(tiny_bert):
    d = Daemon(tiny_bert).start()
    specs = short_tmpdir("fmx-restart-")
    task = TaskProc(write_spec(specs, "survivor", 'pipeline = "text-embedding"'), d.run_dir).start()
    try:
        kept = d.client(timeout_s=10)             # a client connected before the restart
        want = kept.infer("survivor", ["same input"]).embeddings
        assert d.stop() == 0
        task.wait_for(b"daemon lost", 10)
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable):     # daemon down: the task says so, at once
            kept.infer("survivor", ["while down"])
        assert time.monotonic() - t0 < 5.0
        d.start()                                  # same run dir, a new daemon incarnation
        t0 = time.monotonic()
        with d.client() as c:
            wait_ready(c, "survivor", timeout_s=10)
            took = time.monotonic() - t0
        assert np.allclose(kept.infer("survivor", ["same input"]).embeddings, want, atol=1e-5)
        kept.close()
        assert took < 5.0, f"re-registration took {took:.2f}s"     # bench/chaos.py reports it
        assert task.proc.poll() is None           # the same process, never restarted
    finally:
        task.stop()
        d.cleanup()


def test_a_call_to_a_task_whose_process_is_gone_fails_fast(env):
    """A task started by hand dies and nobody restarts it: a client that still holds its
    connection gets TaskUnavailable within the connect grace, not a timeout (sync and async)."""
    import asyncio

    from fmplex.client import CONNECT_GRACE_S, AsyncClient
    specs = short_tmpdir("fmx-gone-")
    task = TaskProc(write_spec(specs, "gone", 'pipeline = "text-embedding"'), env.run_dir).start()

    async def async_call(c, text):
        return await c.infer("gone", [text], timeout_s=20)

    async def scenario():
        async with AsyncClient(env.run_dir) as ac:
            with env.client() as c:
                assert c.infer("gone", ["up"]).embeddings.shape == (1, 32)   # connected, cached
                assert (await async_call(ac, "up")).embeddings.shape == (1, 32)
                task.proc.kill()
                task.proc.wait()
                t0 = time.monotonic()
                with pytest.raises(TaskUnavailable):
                    c.infer("gone", ["down"], timeout_s=20)
                with pytest.raises(TaskUnavailable):
                    await async_call(ac, "down")
                return time.monotonic() - t0
    try:
        took = asyncio.run(scenario())
    finally:
        task.stop()
    assert took < 2 * CONNECT_GRACE_S + 3, took          # not the 20 s timeout

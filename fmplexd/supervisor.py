"""Spawning and supervising task processes for deployed specs.

deploy(spec) starts a task process for SPEC (as the spec's owner when the daemon is root): forked by
the task zygote (fmplexd/task_zygote.py; config `task_zygote`, default on), whose pre-imported pages
every task shares, or, with the zygote off or failing, `python -m tasklets SPEC`. It waits until
the task has registered and committed (READY) and returns its name; a process that exits first
fails the deploy with the error it printed. Who may deploy follows the one authorization rule
(fmplexd.auth). A deployed task that dies later is restarted with exponential backoff (0.1 s doubling to 5 s, reset after 30 s of health); a hung one (heartbeat lost
while its process lives) is killed first. Children never inherit NOTIFY_SOCKET or WATCHDOG_*.
Task processes started by someone else are accepted by the daemon and simply not supervised here.

Isolation: every supervised task process runs `task_nice` nicer than the daemon (so the forward and
the daemon's I/O come first when CPU is contended), and, where the host gives the daemon cgroups to
manage (fmplexd.cgroups), in a cgroup of its own: CPU weight from the task's weight, memory limit
from its spec's memory_mb. A forked process joins both before it runs any task code; an exec'd one
starts under `nice` and is moved into its cgroup right after the exec.

Deployments are recorded in the state directory ({state_dir}/deployed/NAME.json), so a restarted
daemon (which stopped its children on the way down) deploys them again (`restore`); removing a task
deletes its record.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fmplexd.auth import Authority
from fmplexd.cgroups import TaskCgroups, join
from ipc.addresses import RunDir
from ipc.errors import TASK_EXIT_PREFIX, ErrorCode, FmplexError
from ipc.spec import parse_spec

if TYPE_CHECKING:
    from fmplexd.task_zygote import ForkedProcess

log = logging.getLogger("fmplexd.supervisor")
BACKOFF_MIN_S, BACKOFF_MAX_S, HEALTHY_S = 0.1, 5.0, 30.0
READY_TIMEOUT_S = 120.0
SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


@dataclass(slots=True, eq=False)
class Child:
    name: str
    spec_path: str
    owner_uid: int
    weight: float = 1.0
    memory_mb: int = 0
    proc: "asyncio.subprocess.Process | ForkedProcess | None" = None
    started: float = 0.0
    quick_deaths: int = 0          # consecutive deaths within HEALTHY_S of starting
    restarts: int = 0
    died_at: float | None = None
    ready: asyncio.Future | None = None
    stopping: bool = False
    watcher: asyncio.Task | None = None


class Supervisor:
    def __init__(self, run_dir: RunDir, state_dir: str, authority: Authority, use_zygote: bool,
                 tokenizers: list[str], nice: int = 0, cgroups: TaskCgroups | None = None):
        """`tokenizers`: tokenizer files the zygote preloads (shared by every forked task);
        `nice`, `cgroups`: the isolation of task processes (see the module docstring)."""
        self.authority = authority
        self.nice, self.cgroups = nice, cgroups
        self.children: dict[str, Child] = {}
        self.spec_dir = os.path.join(run_dir.path, "specs")
        self.log_dir = os.path.join(run_dir.path, "logs")
        self.record_dir = os.path.join(state_dir or os.path.join(run_dir.path, "state"), "deployed")
        self.env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        self.env["FMPLEX_RUN_DIR"] = run_dir.path          # what every child runs with
        os.makedirs(self.log_dir, mode=0o755, exist_ok=True)
        self.zygote = None
        if use_zygote:
            from fmplexd.task_zygote import TaskZygote
            self.zygote = TaskZygote(sorted(set(tokenizers)),
                                     os.path.join(self.log_dir, "zygote.log"), self.env)

    async def deploy(self, spec_text: str, spec_path: str, uid: int | None) -> str:
        spec = parse_spec(spec_text, base_dir=os.path.dirname(spec_path) or None)
        self.authority.check(uid, spec.owner_uid, f"deploy a task owned by uid {spec.owner_uid}")
        if spec.name in self.children:
            raise FmplexError(ErrorCode.CONFLICT, f"task {spec.name} is already deployed")
        path = spec_path if spec_path and os.path.isabs(spec_path) and os.path.exists(spec_path) \
            else self._write_spec(spec.name, spec_text)
        child = Child(spec.name, path, spec.owner_uid, spec.weight, spec.memory_mb)
        self.children[spec.name] = child
        await self._start(child)
        try:
            await asyncio.wait_for(asyncio.shield(child.ready), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.forget(spec.name)
            raise FmplexError(ErrorCode.TIMEOUT, f"task {spec.name} was not serving within "
                              f"{READY_TIMEOUT_S:.0f}s (see {self.log_dir}/{spec.name}.log)") from None
        except BaseException:
            self.forget(spec.name)
            raise
        self._record(child)
        return spec.name

    def restore(self) -> None:
        """Deploy again what a previous daemon had deployed (in the background)."""
        if not os.path.isdir(self.record_dir):
            return
        for name in sorted(os.listdir(self.record_dir)):
            try:
                with open(os.path.join(self.record_dir, name)) as f:
                    rec = json.load(f)
                with open(rec["spec_path"]) as f:
                    text = f.read()
            except (OSError, ValueError, KeyError) as e:
                log.warning("cannot restore deployment %s: %s", name, e)
                continue
            asyncio.get_running_loop().create_task(self._restore_one(text, rec))

    async def _restore_one(self, text: str, rec: dict) -> None:
        try:
            await self.deploy(text, rec["spec_path"], rec["uid"])
            log.info("restored deployment %s", rec["name"])
        except Exception as e:
            log.warning("restoring %s failed: %s", rec["name"], e)

    def _record(self, child: Child) -> None:
        os.makedirs(self.record_dir, mode=0o700, exist_ok=True)
        tmp = os.path.join(self.record_dir, f".{child.name}.tmp")
        with open(tmp, "w") as f:
            json.dump({"name": child.name, "spec_path": child.spec_path, "uid": child.owner_uid}, f)
        os.replace(tmp, os.path.join(self.record_dir, f"{child.name}.json"))

    def task_ready(self, name: str) -> None:
        """The daemon saw the task commit (READY)."""
        child = self.children.get(name)
        if child is None:
            return
        if child.died_at is not None:
            log.info("task %s serves again %.2fs after its process died", name,
                     time.monotonic() - child.died_at)
            child.died_at = None
        if child.ready is not None and not child.ready.done():
            child.ready.set_result(True)

    def task_died(self, name: str, reason: str, pid: int) -> None:
        """The daemon ended the session of the task's process `pid`. If that process still runs
        (hung), it is killed so that the watcher restarts it. A notice about an earlier process
        (the watcher may already have started the next one) kills nothing."""
        child = self.children.get(name)
        if child is None or child.proc is None or child.stopping or child.proc.pid != pid:
            return
        if child.died_at is None:
            child.died_at = time.monotonic()
        if child.proc.returncode is None:
            log.warning("task %s: %s; killing pid %d", name, reason, child.proc.pid)
            _kill(child.proc, signal.SIGKILL)

    def forget(self, name: str) -> None:
        """Stop supervising (operator removed the task): terminate, never restart."""
        try:
            os.unlink(os.path.join(self.record_dir, f"{name}.json"))
        except FileNotFoundError:
            pass
        child = self.children.pop(name, None)
        if child is not None:
            child.stopping = True
            if child.proc is not None and child.proc.returncode is None:
                _kill(child.proc, signal.SIGTERM)

    async def stop_all(self, timeout_s: float = 5.0) -> None:
        procs = []
        for child in self.children.values():
            child.stopping = True
            if child.proc is not None and child.proc.returncode is None:
                _kill(child.proc, signal.SIGTERM)
                procs.append(child.proc)
        if procs:
            done, pending = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs],
                                               timeout=timeout_s)
            for p in procs:
                if p.returncode is None:
                    _kill(p, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs), return_exceptions=True)
        if self.zygote is not None:
            await self.zygote.close()
        if self.cgroups is not None:
            self.cgroups.close()

    # -- internals ---------------------------------------------------------------------------

    def _write_spec(self, name: str, text: str) -> str:
        os.makedirs(self.spec_dir, mode=0o755, exist_ok=True)
        path = os.path.join(self.spec_dir, f"{name}.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    async def _start(self, child: Child) -> None:
        env = self.env
        uid = gid = None
        if os.getuid() == 0 and child.owner_uid != 0:
            uid, gid = child.owner_uid, _primary_gid(child.owner_uid)
        log_path = os.path.join(self.log_dir, f"{child.name}.log")
        procs = self._place(child)
        child.proc = None
        if self.zygote is not None:
            try:
                child.proc = await self.zygote.spawn(child.name, child.spec_path, log_path, env,
                                                     uid, gid, self.nice, tuple(procs))
            except FmplexError as e:        # the zygote only saves memory: exec instead
                log.warning("task %s: %s; starting it with exec", child.name, e.message)
        if child.proc is None:
            as_user = {} if uid is None else {"user": uid, "group": gid, "extra_groups": []}
            nice = ["nice", "-n", str(self.nice)] if self.nice else []
            with open(log_path, "ab") as log_file:
                child.proc = await asyncio.create_subprocess_exec(
                    *nice, sys.executable, "-m", "tasklets", child.spec_path, "--supervised",
                    stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
                    start_new_session=True, **as_user)
            try:
                join(procs, child.proc.pid)
            except OSError as e:
                log.warning("task %s: cannot move pid %d into its cgroup: %s", child.name,
                            child.proc.pid, e)
        child.started = time.monotonic()
        child.ready = asyncio.get_running_loop().create_future()
        child.watcher = asyncio.get_running_loop().create_task(self._watch(child, log_path))

    def _place(self, child: Child) -> list[str]:
        """The task's cgroup (made or updated): the cgroup.procs files its process joins."""
        if self.cgroups is None:
            return []
        try:
            return self.cgroups.place(child.name, child.weight, child.memory_mb)
        except OSError as e:
            log.warning("task %s runs without a cgroup of its own: %s", child.name, e)
            return []

    async def _watch(self, child: Child, log_path: str) -> None:
        code = await child.proc.wait()
        if child.stopping:
            if self.cgroups is not None and self.children.get(child.name) is not child:
                self.cgroups.release(child.name)
            return
        if not child.ready.done():          # died before ever serving: the deploy fails
            if child.restarts == 0:
                child.ready.set_exception(_last_error(log_path, code))
                return
        if child.died_at is None:
            child.died_at = time.monotonic()
        up = time.monotonic() - child.started
        child.quick_deaths = 0 if up > HEALTHY_S else child.quick_deaths
        child.quick_deaths += 1
        delay = restart_delay(child.quick_deaths)
        log.warning("task %s exited with %s after %.1fs; restarting in %.1fs", child.name, code,
                    up, delay)
        await asyncio.sleep(delay)
        if child.stopping or self.children.get(child.name) is not child:
            return
        child.restarts += 1
        await self._start(child)


def restart_delay(quick_deaths: int) -> float:
    """Delay before a restart after the n-th consecutive quick death (n >= 1): BACKOFF_MIN_S,
    doubling each time, at most BACKOFF_MAX_S. A process that stayed up HEALTHY_S resets n to 1."""
    return min(BACKOFF_MIN_S * 2 ** (quick_deaths - 1), BACKOFF_MAX_S)


def _kill(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _primary_gid(uid: int) -> int:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def _last_error(log_path: str, code: int) -> FmplexError:
    """The typed error a task process printed before exiting, else a generic one."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith(TASK_EXIT_PREFIX):
            code_str, _, message = line[len(TASK_EXIT_PREFIX):].partition(": ")
            try:
                return FmplexError(ErrorCode(code_str), message)
            except ValueError:
                break
    tail = " | ".join(lines[-3:])
    return FmplexError(ErrorCode.TASK_UNAVAILABLE, f"task process exited with {code}: {tail}")

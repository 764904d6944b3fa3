"""Shared test helpers: write an extension into a real slot (as a task process would) and commit
it; start real daemons and task processes and wait on their own signals (sd_notify READY, the task's
"serving" log line), never on sleeps; clean every process up."""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

from fmplexd.slots import ExtensionView, Slot
from ipc.messages import BackboneInfo
from ipc.shm import MappedRegion, store
from tasklets.adapters import Extension, validate
from fmplexd.tiny import write_random_head, write_random_lora
from tasklets.launch import REPO, DaemonProcess, short_tmpdir, wait_notify  # noqa: F401


def commit_extension(ext: Extension, info: BackboneInfo, name: str = "t") -> ExtensionView:
    """Validate, write into a fresh slot through a writable mapping, commit; return the view."""
    validate(ext, info)
    slot = Slot(name, ext.spec, info, generation=1)
    writer = MappedRegion(slot.fd, slot.size, writable=True)
    base = slot.writable_half * slot.half_bytes
    for e in slot.entries:
        store(writer.array(e, base), ext.tensors[e.name], e.dtype)
    slot.commit(slot.writable_half)
    writer.close()
    return slot.active


class Daemon(DaemonProcess):
    """A real fmplexd subprocess on the given backbone directory (see tasklets.launch)."""

    def __init__(self, backbone: str, config: str = "", env: dict | None = None):
        super().__init__(backbone, config, env)


class TaskProc:
    """A real `fmplex task run SPEC` process; start() returns once it logs that it serves."""

    def __init__(self, spec_path: str, run_dir: str, env: dict | None = None, preexec=None):
        self.spec_path, self.run_dir = spec_path, run_dir
        self.env = dict(os.environ, FMPLEX_RUN_DIR=run_dir, **(env or {}))
        self.preexec = preexec
        self.proc: subprocess.Popen | None = None
        self.output = b""

    def start(self, timeout_s: float = 60.0, expect: bytes = b" serving at ") -> "TaskProc":
        self.proc = subprocess.Popen([sys.executable, "-m", "tasklets", "task", "run",
                                      self.spec_path], env=self.env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=self.preexec)
        self.wait_for(expect, timeout_s)
        return self

    def wait_for(self, text: bytes, timeout_s: float) -> None:
        """Read the process's output until `text` appears (or it exits, or time runs out)."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while text not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{text!r} not seen; output: {self.output.decode()[-2000:]}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"task exited ({self.proc.wait()}): "
                                       f"{self.output.decode()[-2000:]}")
                self.output += chunk

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):
            self.output += self.proc.stdout.read() or b""
        self.proc.stdout.close()
        return self.proc.returncode


def write_spec(directory: str, name: str, body: str) -> str:
    path = os.path.join(directory, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'name = "{name}"\n{body}\n')
    return path


write_head = write_random_head
write_lora = write_random_lora


class Traffic:
    """A background client sending requests to some tasks until stopped; records every outcome."""

    def __init__(self, run_dir: str, tasks: list[str], texts=("some input text", "more")):
        import threading
        self.run_dir, self.tasks, self.texts = run_dir, tasks, list(texts)
        self.ok: dict[str, list] = {t: [] for t in tasks}
        self.failed: dict[str, list] = {t: [] for t in tasks}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from ipc.errors import FmplexError
        from tasklets.client import Client
        with Client(self.run_dir, timeout_s=30) as c:
            while not self._stop.is_set():
                for t in self.tasks:
                    try:
                        self.ok[t].append(c.infer(t, self.texts))
                    except FmplexError as e:
                        self.failed[t].append(e)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

"""Real fmplexd daemons and task processes for tests and benchmarks, waited on by their own signals
(sd_notify READY, the task's "serving" log line), never by sleeps; every process is cleaned up.

    DaemonProcess(backbone, config)   fmplex.local_daemon.LocalDaemon, remembered in LIVE until
                                      cleaned up (conftest prints the logs of live daemons on a
                                      failure), with its tasks' logs
    TaskProc(spec_path, run_dir)      a real `python -m tasklets SPEC` process
    GatewayProc(run_dir, *args)       a real `fmplex gateway` on a free loopback port (.url)
    Traffic(run_dir, tasks)           a background client that records every outcome
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time

from fmplex.local_daemon import LocalDaemon, pss_bytes, short_tmpdir, wait_notify  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIVE: list["DaemonProcess"] = []


class DaemonProcess(LocalDaemon):
    """A real fmplexd subprocess in a private directory; `backbone` is one path or {name: path}."""

    def __init__(self, backbone: str | dict = "embedded", config: str = "", env: dict | None = None,
                 workdir: str | None = None, threads: int = 0, dtypes: dict[str, str] | None = None):
        super().__init__(backbone, config, env, workdir, threads, dtypes)
        LIVE.append(self)

    def logs(self, tail: int = 4000) -> str:
        """The daemon's log and its supervised tasks' logs (last `tail` characters of each)."""
        parts = [f"--- fmplexd log ({self.log_path})\n{self.log_text()[-tail:]}"]
        log_dir = os.path.join(self.run_dir, "logs")
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
            with open(os.path.join(log_dir, name), errors="replace") as f:
                parts.append(f"--- task log {name}\n{f.read()[-tail:]}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self in LIVE:
            LIVE.remove(self)


Daemon = DaemonProcess


class ChildProc:
    """A child process whose output (stdout and stderr) is read as it comes: wait_for, stop."""

    proc: subprocess.Popen | None = None
    output = b""

    def spawn(self, argv: list[str], env: dict, preexec=None) -> None:
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=preexec)

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
                    raise RuntimeError(f"process exited ({self.proc.wait()}): "
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


class TaskProc(ChildProc):
    """A real task process; start() returns once it logs that it serves."""

    def __init__(self, spec_path: str, run_dir: str, env: dict | None = None, preexec=None):
        self.spec_path, self.run_dir = spec_path, run_dir
        self.env = dict(os.environ, FMPLEX_RUN_DIR=run_dir, **(env or {}))
        self.preexec = preexec

    def start(self, timeout_s: float = 60.0, expect: bytes = b" serving at ") -> "TaskProc":
        self.spawn([sys.executable, "-m", "tasklets", self.spec_path], self.env, self.preexec)
        self.wait_for(expect, timeout_s)
        return self


class GatewayProc(ChildProc):
    """A real `fmplex gateway --listen 127.0.0.1:0 ARGS...`; start() returns once it serves;
    `url` is its base (http://127.0.0.1:PORT/v1)."""

    READY = b"fmplex gateway: serving "

    def __init__(self, run_dir: str, *args: str):
        self.run_dir, self.args, self.url = run_dir, args, ""

    def start(self, timeout_s: float = 60.0) -> "GatewayProc":
        self.spawn([sys.executable, "-m", "fmplex", "--run-dir", self.run_dir, "gateway",
                    "--listen", "127.0.0.1:0", *self.args], dict(os.environ))
        self.wait_for(b"/v1 (", timeout_s)                 # the line names the whole URL
        line = self.output[self.output.index(self.READY):].split(b"/v1 (", 1)[0].decode()
        self.url = line.split()[-1] + "/v1"
        return self


def write_spec(directory: str, name: str, body: str) -> str:
    path = os.path.join(directory, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'name = "{name}"\n{body}\n')
    return path


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
        from fmplex import Client
        from ipc.errors import FmplexError
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

"""Run a real fmplexd as a child process (the demo's daemon; tests and benchmarks build on it).

start() returns once the daemon says READY=1 on its own sd_notify socket (an event, not a guess);
stop() sends SIGTERM and returns the exit status. The daemon runs in its own directory (config,
run dir, log, notify socket).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def short_tmpdir(prefix: str = "fmx-") -> str:
    """A short directory under /tmp (ipc:// paths must stay under 107 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def wait_notify(sock: socket.socket, want: bytes, timeout_s: float) -> list[bytes]:
    """Read sd_notify datagrams until one contains `want`; returns every datagram read."""
    got, deadline = [], time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {want!r} from the daemon; got {got}")
        sock.settimeout(left)
        data = sock.recv(65536)
        got.append(data)
        if want in data:
            return got


def pss_bytes(pid: int) -> int:
    """Proportional set size of a process (shared pages split among their users), from /proc."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class LocalDaemon:
    """A real fmplexd subprocess in a private directory. `backbones`: {name: path} ("embedded",
    a model directory, ...); `config`: extra TOML lines for fmplexd.toml; `dtypes`: {name: dtype}
    for backbones not in float32."""

    def __init__(self, backbones: dict[str, str] | str = "embedded", config: str = "",
                 env: dict | None = None, workdir: str | None = None, threads: int = 0,
                 dtypes: dict[str, str] | None = None):
        if isinstance(backbones, str):
            backbones = {"default": backbones}
        self.dir = workdir or short_tmpdir()
        self.run_dir = os.path.join(self.dir, "run")
        self.notify_path = os.path.join(self.dir, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.config_path = os.path.join(self.dir, "fmplexd.toml")
        dtypes = dtypes or {}
        tables = "".join(f'[[backbone]]\nname = "{n}"\npath = "{p}"\n'
                         f'dtype = "{dtypes.get(n, "float32")}"\n' for n, p in backbones.items())
        if "metrics_listen" not in config:       # many daemons at once: each on a free port
            config += '\nmetrics_listen = "127.0.0.1:0"'   # (its URL: InfoReply.metrics)
        with open(self.config_path, "w") as f:
            f.write(f'run_dir = "{self.run_dir}"\nthreads = {threads}\n{config}\n{tables}')
        self.env = dict(os.environ, NOTIFY_SOCKET=self.notify_path, FMPLEX_RUN_DIR=self.run_dir,
                        **(env or {}))
        self.log_path = os.path.join(self.dir, "fmplexd.log")
        self.proc: subprocess.Popen | None = None
        self.notices: list[bytes] = []

    def start(self, timeout_s: float = 120.0) -> "LocalDaemon":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fmplexd.main", "--config",
                                          self.config_path], env=self.env, stdout=log, stderr=log)
        try:
            self.notices += wait_notify(self.notify, b"READY=1", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def client(self, timeout_s: float = 30.0):
        from fmplex.client import Client
        return Client(self.run_dir, timeout_s=timeout_s)

    def tasks(self) -> dict:
        """Every task's TaskStats by name (the daemon's ListTasks)."""
        from ipc.messages import ListTasks
        with self.client() as c:
            return {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Stop the daemon and close the notify socket (its directory is the caller's)."""
        self.stop()
        self.notify.close()

"""Start and stop a real fmplexd as a child process (for the demo, benchmarks and tests).

start() returns once the daemon says READY=1 on its sd_notify socket (an event, not a guess);
stop() sends SIGTERM and returns the exit status. The daemon runs in its own run directory.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIVE: list["DaemonProcess"] = []


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


class DaemonProcess:
    """A real fmplexd subprocess in a private directory (config, run dir, log, notify socket).
    Every instance is remembered in `LIVE` until cleaned up (tests print their logs on failure)."""

    def __init__(self, backbone: str = "embedded", config: str = "", env: dict | None = None,
                 workdir: str | None = None, threads: int = 0):
        self.dir = workdir or short_tmpdir()
        self.run_dir = os.path.join(self.dir, "run")
        self.notify_path = os.path.join(self.dir, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.config_path = os.path.join(self.dir, "fmplexd.toml")
        with open(self.config_path, "w") as f:
            f.write(f'run_dir = "{self.run_dir}"\nthreads = {threads}\n{config}\n'
                    f'[[backbone]]\nname = "default"\npath = "{backbone}"\n')
        self.env = dict(os.environ, NOTIFY_SOCKET=self.notify_path, FMPLEX_RUN_DIR=self.run_dir,
                        **(env or {}))
        self.log_path = os.path.join(self.dir, "fmplexd.log")
        self.proc: subprocess.Popen | None = None
        self.notices: list[bytes] = []
        LIVE.append(self)

    def logs(self, tail: int = 4000) -> str:
        """The daemon's log and its supervised tasks' logs (last `tail` characters of each)."""
        parts = [f"--- fmplexd log ({self.log_path})\n{self.log_text()[-tail:]}"]
        log_dir = os.path.join(self.run_dir, "logs")
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
            with open(os.path.join(log_dir, name), errors="replace") as f:
                parts.append(f"--- task log {name}\n{f.read()[-tail:]}")
        return "\n".join(parts)

    def start(self, timeout_s: float = 120.0) -> "DaemonProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fmplexd.main", "--config",
                                          self.config_path], env=self.env, cwd=REPO,
                                         stdout=log, stderr=log)
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
        from tasklets.client import Client
        return Client(self.run_dir, timeout_s=timeout_s)

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        self.notify.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self in LIVE:
            LIVE.remove(self)

"""systemd's sd_notify protocol, implemented on $NOTIFY_SOCKET (no libsystemd needed).

A Type=notify unit learns READY=1 when the daemon serves, STATUS=..., STOPPING=1 on shutdown,
EXTEND_TIMEOUT_USEC=... during long backbone loads, and WATCHDOG=1 at half of WATCHDOG_USEC when
the unit sets WatchdogSec=. `Notifier.from_environ` takes these variables out of the environment,
so no child process (task processes included) inherits them.
"""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int = 0):
        self.address = address
        self.watchdog_interval_s = watchdog_usec / 2e6 if watchdog_usec else 0.0
        self._last_watchdog = 0.0
        self._sock = None
        if address:
            if address.startswith("@"):                 # abstract namespace
                address = "\0" + address[1:]
            self._target = address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)   # a listener that stops reading must not stall the loop

    @classmethod
    def from_environ(cls, environ=os.environ) -> "Notifier":
        address = environ.pop("NOTIFY_SOCKET", None)
        usec, pid = environ.pop("WATCHDOG_USEC", ""), environ.pop("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0
        return cls(address, watchdog)

    def __call__(self, ready: bool = False, stopping: bool = False, status: str | None = None,
                 watchdog: bool = False, extend_timeout_s: float | None = None) -> None:
        if self._sock is None:
            return
        lines = []
        if ready:
            lines.append("READY=1")
        if stopping:
            lines.append("STOPPING=1")
        if status is not None:
            lines.append(f"STATUS={status}")
        if extend_timeout_s is not None:
            lines.append(f"EXTEND_TIMEOUT_USEC={int(extend_timeout_s * 1e6)}")
        if watchdog and self.watchdog_interval_s:
            now = time.monotonic()
            if now - self._last_watchdog >= self.watchdog_interval_s:
                self._last_watchdog = now
                lines.append("WATCHDOG=1")
        if lines:
            try:
                self._sock.sendto(("\n".join(lines) + "\n").encode(), self._target)
            except OSError:
                pass      # systemd gone, not listening or its queue full: the update is dropped

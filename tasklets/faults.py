"""Fault injection for tests and the chaos benchmark: off unless FMPLEX_FAULTS is set.

FMPLEX_FAULTS="raise=<text>,segfault=<text>,hang=<text>,exit=<text>" makes a task process, when an
input equals <text>: raise an exception inside its pipeline (the request gets an INTERNAL error,
the process lives on), die of SIGSEGV, stop its event loop forever (no more heartbeats), or exit 3.
Read at start-up (and by `reload`); a process without the variable pays one dict lookup per request.
"""
from __future__ import annotations

import os
import signal
import time



def _from_env() -> dict[str, str]:
    return dict(item.split("=", 1) for item in os.environ.get("FMPLEX_FAULTS", "").split(",")
                if "=" in item)


FAULTS: dict[str, str] = _from_env()


def reload() -> None:
    """Read FMPLEX_FAULTS again (a process forked by the task zygote gets its env after import)."""
    global FAULTS
    FAULTS = _from_env()


class InjectedFault(RuntimeError):
    pass


def check(texts: list[str]) -> None:
    """Trigger the configured fault if an input asks for it."""
    if not FAULTS:
        return
    for kind, trigger in FAULTS.items():
        if trigger in texts:
            if kind == "raise":
                raise InjectedFault(f"injected pipeline failure on {trigger!r}")
            if kind == "segfault":
                os.kill(os.getpid(), signal.SIGSEGV)
            if kind == "exit":
                os._exit(3)
            if kind == "hang":
                while True:                 # blocks the event loop: heartbeats stop
                    time.sleep(3600)

"""Fault injection into task processes, for tests and the chaos benchmark. Product code has no hook
for it: `fault_env(spec)` returns the environment that makes a Python process load
testkit/inject/sitecustomize.py, which patches the task process's request handler as
tasklets.process is imported (in a task process, or in the task zygote whose forks then share the
patch).

spec = "raise=<text>,segfault=<text>,hang=<text>,exit=<text>": when an input equals <text>, the
task process raises inside its pipeline (the request gets an INTERNAL error, the process lives
on), dies of SIGSEGV, blocks its event loop forever (no more heartbeats), or exits 3. The triggers
are read from FMPLEX_FAULTS at each request, so a forked task sees its own environment.
"""
from __future__ import annotations

import functools
import os
import signal
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INJECT_DIR = os.path.join(REPO, "testkit", "inject")


class InjectedFault(RuntimeError):
    pass


def fault_env(spec: str, base: dict | None = None) -> dict:
    """Environment additions for a daemon or task process whose task processes inject `spec`."""
    path = (base or os.environ).get("PYTHONPATH", "")
    return {"FMPLEX_FAULTS": spec,
            "PYTHONPATH": os.pathsep.join(p for p in (INJECT_DIR, REPO, path) if p)}


def triggers() -> dict[str, str]:
    return dict(item.split("=", 1) for item in os.environ.get("FMPLEX_FAULTS", "").split(",")
                if "=" in item)


def check(texts: list[str]) -> None:
    """Trigger the configured fault if an input asks for it."""
    for kind, trigger in triggers().items():
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


def patch_process(module) -> None:
    """Wrap module.TaskProcess.handle (tasklets.process) so that it checks the triggers first,
    against a request's texts (or its prompt)."""
    handle = module.TaskProcess.handle

    @functools.wraps(handle)
    async def faulty_handle(self, msg, *args, **kwargs):
        check(list(getattr(msg, "texts", None) or [getattr(msg, "prompt", None) or ""]))
        return await handle(self, msg, *args, **kwargs)

    module.TaskProcess.handle = faulty_handle

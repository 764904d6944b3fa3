"""Closing a client never hangs, whatever state its connections are in."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLOSE_AT_ONCE = """
import asyncio
from fmplex.client import AsyncClient

async def main():
    c = AsyncClient("/nonexistent-fmplex-run")
    c._open("t", "ipc:///nonexistent-fmplex-run/t.sock", watch=True)   # its watcher never ran
    await c.close()
    print("closed")

asyncio.run(main())
"""


def test_async_client_closes_with_a_watcher_that_never_ran():
    """A connection opened and closed before the event loop ran its monitor's watcher: the
    monitor socket was left open and zmq's context term waited for it forever (seen when
    bench.serve closed its client after answering 600 tasks)."""
    out = subprocess.run([sys.executable, "-c", CLOSE_AT_ONCE], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "closed", out.stderr

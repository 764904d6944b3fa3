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


MANY_CONNECTIONS = """
import asyncio, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
from fmplex.client import AsyncClient

async def main():
    c = AsyncClient("/nonexistent-fmplex-run")
    for i in range(700):                       # a socket and its monitor each: 1,400 sockets
        c._open(f"t{i}", f"ipc:///nonexistent-fmplex-run/t{i}.sock", watch=True)
    await asyncio.sleep(0)
    await c.close()
    print("opened and closed")

asyncio.run(main())
"""


def test_an_async_client_reaches_hundreds_of_tasks():
    """libzmq's default limit of 1,023 sockets per context stopped one client at about 340
    tasks (bench.serve's capacity probe); the client raises it to libzmq's own limit."""
    import resource
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048:
        import pytest
        pytest.skip("this machine's hard file-descriptor limit is below 2,048")
    out = subprocess.run([sys.executable, "-c", MANY_CONNECTIONS], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "opened and closed", out.stderr[-2000:]

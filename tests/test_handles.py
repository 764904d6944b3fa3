"""The handle plane: a HandleServer in this process's event loop, HandleClients in real child processes.

fds cross processes (SCM_RIGHTS), the kernel's SO_PEERCRED names the peer, misbehaving clients get an
Error and the server keeps serving, and a client's death reaches on_close at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ipc import aio, shm
from ipc.errors import ErrorCode, FmplexError
from ipc.handles import Credentials, HandleServer
from ipc.messages import Hello, Ok, OpenRegions, RegionsGranted

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 20          # bound of every wait; a healthy run takes well under a second per step
NOBODY = 65534

CHILD = r"""
import json, os, select, socket, sys
from ipc.handles import HandleClient, recv_message, send_message
from ipc.messages import Hello, Info, OpenRegions, Role
from ipc.shm import MappedRegion

path, mode = sys.argv[1], sys.argv[2]
if mode == "nobody":                      # drop root before connecting (imports are done)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

def out(**kw):
    print(json.dumps(kw), flush=True)

def read_regions(client, ref):
    reply, fds = client.request(OpenRegions(ref=ref, token=b"good"))
    region = MappedRegion(fds[0], reply.backbone.size)
    entry = reply.backbone.entries[0]
    return dict(type=reply.TYPE, ref=reply.ref, nfds=len(fds), values=region.array(entry).tolist(),
                verify=region.verify(reply.backbone), uid=os.getuid(), gid=os.getgid())

def reply_of(client):
    reply, fds = recv_message(client.sock)
    return dict(type=reply.TYPE, ref=reply.ref, code=getattr(reply, "code", None) and reply.code.value,
                nfds=len(fds))

def closed_by_server(r):
    # The server got the write end of this pipe; EOF here means it closed it (and we closed ours).
    ready, _, _ = select.select([r], [], [], 10)
    return bool(ready) and os.read(r, 1) == b""

client = HandleClient(path, timeout_s=10)
if mode in ("read", "nobody"):
    out(**read_regions(client, 5))
elif mode == "hold":
    reply, _ = client.request(Hello(ref=1, proto=2, role=Role.TASK, pid=os.getpid()))
    out(type=reply.TYPE)
    sys.stdin.read()                      # until killed
elif mode == "abuse":
    r, w = os.pipe()
    send_message(client.sock, OpenRegions(ref=6, token=b"good"), [w])
    os.close(w)
    out(step="fds", **reply_of(client), closed=closed_by_server(r))

    r, w = os.pipe()
    socket.send_fds(client.sock, [b"\x81\xa4type\xc1"], [w] * 12)   # malformed and too many fds
    os.close(w)
    out(step="malformed+fds", **reply_of(client), closed=closed_by_server(r))

    client.sock.send(b"\xc1 not MessagePack")
    out(step="malformed", **reply_of(client))

    client.sock.send(b"\x80" * (100 << 10))                     # larger than any request
    out(step="oversized", **reply_of(client))

    send_message(client.sock, Info(ref=8))                        # valid, not for this socket
    out(step="unexpected", **reply_of(client))

    reply, _ = client.request(OpenRegions(ref=9, token=b"bad"))  # the handler refuses
    out(step="handler", type=reply.TYPE, ref=reply.ref, code=reply.code.value)

    out(step="same-connection", **read_regions(client, 10))
    out(step="new-connection", **read_regions(HandleClient(path, timeout_s=10), 11))
"""


def short_dir() -> str:
    """A short directory (AF_UNIX paths are limited) that a dropped-privilege child can traverse."""
    d = tempfile.mkdtemp(prefix="fmh", dir="/tmp")
    os.chmod(d, 0o755)
    return d


class Plane:
    """A HandleServer granting one exported region, recording what it sees."""

    def __init__(self, path: str):
        self.values = np.arange(24, dtype=np.float32).reshape(4, 6) * 0.5
        self.fd, self.manifest = shm.export_tensors("backbone", {"w": self.values})
        self.requests: list[tuple[str, Credentials, int]] = []
        self.closed: list[tuple[int, Credentials]] = []
        self.closed_event = asyncio.Event()
        self.server = HandleServer(path, self.handle, self.on_close,
                                   allowed=frozenset({OpenRegions, Hello}))

    def handle(self, msg, creds, conn_id):
        self.requests.append((msg.TYPE, creds, conn_id))
        if isinstance(msg, Hello):
            return Ok(ref=msg.ref), []
        if msg.token != b"good":
            raise FmplexError(ErrorCode.UNAUTHORIZED, "bad token")
        return RegionsGranted(ref=msg.ref, backbone=self.manifest, slot_size=0,
                              slot_generation=1), [self.fd]

    def on_close(self, conn_id, creds):
        self.closed.append((conn_id, creds))
        self.closed_event.set()

    async def wait_closed(self, n: int = 1):
        async with asyncio.timeout(WAIT_S):
            while len(self.closed) < n:
                self.closed_event.clear()
                await self.closed_event.wait()

    def close(self):
        self.server.close()
        os.close(self.fd)


@contextlib.asynccontextmanager
async def plane_and_dir():
    d = short_dir()
    plane = Plane(os.path.join(d, "handles.sock"))
    plane.server.start()
    try:
        yield plane
    finally:
        plane.close()
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def child(path: str, mode: str):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, path, mode, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.communicate(), WAIT_S)


async def read_json(proc) -> dict:
    line = await asyncio.wait_for(proc.stdout.readline(), WAIT_S)
    if not line:
        err = await asyncio.wait_for(proc.stderr.read(), WAIT_S)
        pytest.fail(f"child ended early: {err.decode()}")
    return json.loads(line)


def run(coro):
    return aio.run(coro)


# ---------------------------------------------------------------- tests

def test_fds_cross_processes_and_peer_credentials_are_the_childs():
    async def main():
        async with plane_and_dir() as plane, child(plane.server.path, "read") as proc:
            got = await read_json(proc)
            assert got["type"] == "regions_granted" and got["ref"] == 5 and got["nfds"] == 1
            assert got["values"] == plane.values.tolist() and got["verify"] is True
            assert await asyncio.wait_for(proc.wait(), WAIT_S) == 0
            await plane.wait_closed()          # a clean exit is an EOF too
            [(kind, creds, conn_id)] = plane.requests
            assert kind == "open_regions"
            assert creds == Credentials(pid=proc.pid, uid=os.getuid(), gid=os.getgid())
            assert plane.closed == [(conn_id, creds)]
    run(main())


def test_peer_uid_of_a_child_that_dropped_root():
    if os.getuid() != 0:
        pytest.skip("needs root to switch the child to uid 65534")

    async def main():
        async with plane_and_dir() as plane, child(plane.server.path, "nobody") as proc:
            assert oct(os.stat(plane.server.path).st_mode & 0o777) == oct(0o666)
            got = await read_json(proc)
            assert (got["uid"], got["gid"]) == (NOBODY, NOBODY)
            # The fd grants access by itself: the unprivileged child maps the region it was given.
            assert got["values"] == plane.values.tolist() and got["verify"] is True
            [(_, creds, _)] = plane.requests
            assert creds == Credentials(pid=proc.pid, uid=NOBODY, gid=NOBODY)
    run(main())


def test_misbehaving_client_gets_errors_and_the_server_keeps_serving():
    async def main():
        async with plane_and_dir() as plane, child(plane.server.path, "abuse") as proc:
            steps = {}
            for _ in range(8):
                got = await read_json(proc)
                steps[got.pop("step")] = got
            # fds sent to the server: refused with UNEXPECTED, correlated by ref, and closed.
            assert steps["fds"] == {"type": "error", "ref": 6, "code": "unexpected", "nfds": 0,
                                    "closed": True}
            # Too many fds on a malformed datagram: an Error, and every fd closed.
            assert steps["malformed+fds"] == {"type": "error", "ref": 0, "code": "too_large",
                                              "nfds": 0, "closed": True}
            assert steps["malformed"] == {"type": "error", "ref": 0, "code": "bad_frame", "nfds": 0}
            assert steps["oversized"] == {"type": "error", "ref": 0, "code": "too_large", "nfds": 0}
            assert steps["unexpected"] == {"type": "error", "ref": 8, "code": "unexpected", "nfds": 0}
            assert steps["handler"] == {"type": "error", "ref": 9, "code": "unauthorized"}
            for step, ref in (("same-connection", 10), ("new-connection", 11)):
                assert steps[step]["type"] == "regions_granted" and steps[step]["ref"] == ref
                assert steps[step]["values"] == plane.values.tolist()
            assert await asyncio.wait_for(proc.wait(), WAIT_S) == 0
            await plane.wait_closed(2)
            # Only well-formed, fd-free, accepted messages reached the handler.
            assert [kind for kind, _, _ in plane.requests] == ["open_regions"] * 3
            assert {creds.pid for _, creds, _ in plane.requests} == {proc.pid}
    run(main())


def test_on_close_is_called_when_the_client_process_is_killed():
    async def main():
        async with plane_and_dir() as plane, child(plane.server.path, "hold") as proc:
            assert (await read_json(proc))["type"] == "ok"
            [(_, creds, conn_id)] = plane.requests
            assert plane.closed == []
            proc.kill()                        # SIGKILL: no goodbye, the kernel closes the socket
            await plane.wait_closed()
            assert plane.closed == [(conn_id, creds)] and creds.pid == proc.pid
            assert await asyncio.wait_for(proc.wait(), WAIT_S) == -9
    run(main())


def test_server_close_ends_open_connections_and_removes_the_socket():
    async def main():
        async with plane_and_dir() as plane, child(plane.server.path, "hold") as proc:
            assert (await read_json(proc))["type"] == "ok"
            path = plane.server.path
            plane.server.close()
            assert len(plane.closed) == 1 and plane.closed[0][1].pid == proc.pid
            assert not os.path.exists(path)
            plane.server.start()               # restartable on the same path
            assert os.path.exists(path)
    run(main())

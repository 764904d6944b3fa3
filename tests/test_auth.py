"""Per-tenant authentication with a real daemon on the tiny backbone (docs/protocol.md §4).

A process "as another uid" is a child started as root that imports everything it needs and only
then drops to that uid (the venv's python lives under /root, which other uids cannot traverse, so
they cannot exec it nor import anything lazily). Every wait is a bounded socket poll; a refused
connection is checked as silence within SILENCE_MS plus the socket monitor's own account of why.
"""
import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from ipc import aio, transport
from ipc.addresses import RunDir, socket_path
from ipc.errors import ErrorCode
from ipc.handles import HandleClient
from ipc.messages import (PROTOCOL_VERSION, Error, ExtensionSpec, Infer, InferReply, ListTasks,
                          LoraEntry, OpenRegions, Output, Register, RegionsGranted,
                          RemoveTask, Resolve, TaskConfig)
from tasklets.daemon_link import DaemonLink
from testkit.launch import REPO, Daemon, TaskProc, short_tmpdir, write_spec

NOBODY = 65534           # tenant B (and the "other uid" of most checks)
OTHER = 65533            # a third tenant, owner of nothing
WAIT_S = 30              # bound of every wait that should succeed
SILENCE_MS = 1500        # how long a refused peer is listened to before "no reply" is concluded
HIDDEN = 32

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch children to other uids")

# One Infer on a task endpoint; shared by the parent (exec'd below) and the children (CHILD).
INFER_ONCE = r"""
def infer_once(arg):
    '''One Infer on a task endpoint. arg: address, wait_ms, optional curve = [server, public,
    secret] (Z85), optional until = a socket-monitor event name. With `until`, that event is awaited
    first (bounded by until_ms): it says why a refused peer hears nothing; the socket is then
    listened to for wait_ms. Returns the reply (None if none came) and the events seen.'''
    import time
    ctx = zmq.Context()
    curve = tuple(k.encode() for k in arg["curve"]) if arg.get("curve") else None
    sock = transport.dealer(ctx, arg["address"], curve=curve)
    monitor = sock.get_monitor_socket()
    events = []
    try:
        transport.send(sock, Infer(ref=1, texts=["hello tenant"], proto=PROTOCOL_VERSION))
        if arg.get("until"):
            deadline = time.monotonic() + arg.get("until_ms", 30_000) / 1e3
            while arg["until"] not in events:
                left = int((deadline - time.monotonic()) * 1000)
                if left <= 0 or not monitor.poll(left):
                    break
                events.append(zmq.Event(recv_monitor_message(monitor)["event"]).name)
        reply = None
        if sock.poll(arg["wait_ms"]):
            msg = transport.recv_sync(sock, router_side=False).decode()
            reply = dict(type=msg.TYPE, ref=msg.ref,
                         shape=list(msg.embeddings.shape) if isinstance(msg, InferReply) else None,
                         code=msg.code.value if isinstance(msg, Error) else None)
        while monitor.poll(0):
            events.append(zmq.Event(recv_monitor_message(monitor)["event"]).name)
        return dict(reply=reply, events=events)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()
"""
exec(INFER_ONCE)

# Runs as root, imports everything, then becomes argv[1]'s uid and plays one scenario (argv[2])
# with JSON arguments (argv[3]); prints one JSON line.
CHILD = r"""
import asyncio, contextlib, io, json, os, sys
import numpy as np
import shutil
import fmplex.cli, fmplex.client, fmplex.render
fmplex.cli.parser().parse_args(["info"])         # argparse's own lazy imports, while still root
import zmq
from zmq.utils.monitor import recv_monitor_message
from ipc import aio, transport
from ipc.addresses import RunDir
from ipc.errors import FmplexError
from ipc.handles import HandleClient
from ipc.messages import (PROTOCOL_VERSION, Error, ExtensionSpec, Infer, InferReply, OpenRegions,
                          Output, Submit, TaskConfig)
from tasklets.daemon_link import DaemonLink

%s
uid, mode, arg = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)


def out(**kw):
    print(json.dumps(dict(uid=os.getuid(), **kw)), flush=True)


async def register():
    link = DaemonLink(RunDir(arg["run"]))
    try:
        await link.open(10)
        s = await link.register(TaskConfig(name=arg["name"], owner_uid=arg["owner"]),
                                ExtensionSpec(), {})
        version = s.version
        await link.unregister(s)
        return dict(ok=True, version=version)
    except FmplexError as e:
        return dict(ok=False, code=e.code.value, message=e.message)
    finally:
        await link.close()


def open_regions():
    got = []
    for i, token in enumerate(arg["tokens"]):
        client = HandleClient(arg["path"])
        reply, fds = client.request(OpenRegions(ref=i + 1, token=bytes.fromhex(token)))
        for fd in fds:
            os.close(fd)
        got.append(dict(type=reply.TYPE, ref=reply.ref, nfds=len(fds),
                        code=reply.code.value if isinstance(reply, Error) else None,
                        message=getattr(reply, "message", "")))
        client.close()
    return got


def submit():
    ctx = zmq.Context()
    sock = transport.dealer(ctx, arg["address"])
    msg = Submit(epoch=arg["epoch"], ref=7, output=Output.POOLED, lengths=[3],
                 ids=np.asarray([101, 2000, 102], np.int32), deadline_ms=5000)
    try:
        reply = transport.request(sock, msg, timeout_s=30)
        return dict(type=reply.TYPE, ref=reply.ref,
                    code=reply.code.value if isinstance(reply, Error) else None,
                    message=getattr(reply, "message", ""))
    finally:
        sock.close(linger=0)
        ctx.term()


if mode == "register":
    out(**aio.run(register()))
elif mode == "open":
    out(replies=open_regions())
elif mode == "submit":
    out(**submit())
elif mode == "infer":
    out(**infer_once(arg))
elif mode == "cli":
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = fmplex.cli.main(["--run-dir", arg["run"], *arg["argv"]])
    out(code=code, out=stdout.getvalue(), err=stderr.getvalue())
""" % INFER_ONCE


def run_as(uid: int, mode: str, **arg) -> dict:
    """Play one scenario in a child that dropped to `uid`; its one JSON line."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(uid), mode, json.dumps(arg)],
                          cwd=REPO, capture_output=True, timeout=WAIT_S + 30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


async def run_as_async(uid: int, mode: str, **arg) -> dict:
    """run_as without blocking the event loop (a DaemonLink of the parent keeps heart-beating)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(uid), mode, json.dumps(arg), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S + 30)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


# A task process owned by and running as another uid: started as root, drops after its imports.
TASK_AS_UID = r"""
import asyncio, logging, os, random, signal, sys
import numpy, tokenizers, zmq, zmq.asyncio, uvloop
from ipc import aio
import tasklets.process
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sys.exit(tasklets.process.main(sys.argv[2], sys.argv[3]))
"""


class TaskAsUid(TaskProc):
    def __init__(self, spec_path: str, run_dir: str, uid: int):
        super().__init__(spec_path, run_dir, env={"PYTHONPATH": str(REPO)})
        self.uid = uid

    def start(self, timeout_s: float = 60.0, expect: bytes = b" serving at ") -> "TaskAsUid":
        self.proc = subprocess.Popen([sys.executable, "-c", TASK_AS_UID, str(self.uid),
                                      self.spec_path, self.run_dir], env=self.env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.wait_for(expect, timeout_s)
        return self


@pytest.fixture(scope="module")
def world(tiny_bert):
    """A daemon whose run directory other uids can reach (as /run/fmplex would be), on a copy of
    the tiny backbone that they can read (its tokenizer), and a world-readable spec directory."""
    base = short_tmpdir("fmx-auth-")
    os.chmod(base, 0o755)
    backbone = os.path.join(base, "bb")
    shutil.copytree(tiny_bert, backbone)
    os.chmod(backbone, 0o755)
    for name in os.listdir(backbone):
        os.chmod(os.path.join(backbone, name), 0o644)
    specs = os.path.join(base, "specs")
    os.makedirs(specs, mode=0o755)
    os.chmod(specs, 0o755)
    d = Daemon(backbone, config="liveness_ms = 5000")       # slack for a loaded machine
    os.chmod(d.dir, 0o711)
    d.start()
    yield d, specs
    d.cleanup()
    shutil.rmtree(base, ignore_errors=True)


def task_names(c) -> set[str]:
    return {t.name for t in c.control(ListTasks(ref=c.ref())).tasks}


# ---------------------------------------------------------------- task plane: register

@needs_root
def test_task_plane_register_needs_the_owners_uid(world):
    d, _ = world
    refused = run_as(NOBODY, "register", run=d.run_dir, name="root-owned", owner=0)
    assert refused["uid"] == NOBODY
    assert refused == {"uid": NOBODY, "ok": False, "code": "unauthorized",
                       "message": f"uid {NOBODY} may not register a task owned by uid 0"}
    own = run_as(NOBODY, "register", run=d.run_dir, name="nobody-owned", owner=NOBODY)
    assert own == {"uid": NOBODY, "ok": True, "version": 1}
    with d.client() as c:
        assert "root-owned" not in task_names(c)
    # Its first registration made the tenant's directory, owned by the tenant, 0700.
    st = os.stat(RunDir(d.run_dir).tenant_dir(NOBODY))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)


# ---------------------------------------------------------------- handle plane: slots

@needs_root
def test_a_task_cannot_map_another_tasks_slot(world):
    d, _ = world
    ext = ExtensionSpec(lora=[LoraEntry(layer=0, module="query", rank=4, scale=2.0)])
    with d.client() as c:
        reg = c.control(Register(ref=c.ref(), proto=PROTOCOL_VERSION,
                                 task=TaskConfig(name="root-slot", owner_uid=0), extension=ext))
        token = reg.slot.token
        wrong = bytes(b ^ 0xFF for b in token)
        try:
            got = run_as(NOBODY, "open", path=RunDir(d.run_dir).handles,
                         tokens=[token.hex(), wrong.hex()])["replies"]
            assert got[0] == {"type": "error", "ref": 1, "nfds": 0, "code": "unauthorized",
                              "message": f"uid {NOBODY} may not map the slot of task root-slot"}
            assert got[1] == {"type": "error", "ref": 2, "nfds": 0, "code": "unauthorized",
                              "message": "unknown or expired slot token"}
            # The token is real: its owner (root) gets the two fds with it.
            owner = HandleClient(RunDir(d.run_dir).handles)
            reply, fds = owner.request(OpenRegions(ref=3, token=token))
            for fd in fds:
                os.close(fd)
            owner.close()
            assert isinstance(reply, RegionsGranted) and len(fds) == 2
        finally:
            c.control(RemoveTask(ref=c.ref(), name="root-slot"))


# ---------------------------------------------------------------- task plane: sessions

@needs_root
def test_a_task_cannot_submit_as_another_task(world):
    d, _ = world

    def requests(name):
        with d.client() as c:
            t = {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}[name]
            return t.requests, t.served_tokens, t.errors

    async def main():
        link = DaemonLink(RunDir(d.run_dir))
        await link.open(10)
        try:
            s = await link.register(TaskConfig(name="root-submit", owner_uid=0), ExtensionSpec(), {})
            ids = np.asarray([101, 2000, 102], np.int32)
            first = await link.submit(s, Output.POOLED, ids, [3], 5000)
            before = requests("root-submit")
            stolen = await run_as_async(NOBODY, "submit", address=RunDir(d.run_dir).tasks,
                                        epoch=s.epoch)
            after = requests("root-submit")
            again = await link.submit(s, Output.POOLED, ids, [3], 5000)
            await link.unregister(s)
            return first, before, stolen, after, again
        finally:
            await link.close()

    first, before, stolen, after, again = aio.run(main())
    assert stolen == {"uid": NOBODY, "type": "error", "ref": 7, "code": "unauthorized",
                      "message": f"uid {NOBODY} may not act for task root-submit"}
    assert before == after == (1, 3, 0)             # nothing ran, nothing counted
    assert first.data.shape == again.data.shape == (1, HIDDEN)
    assert np.allclose(first.data, again.data, atol=1e-6)


# ---------------------------------------------------------------- client endpoints (ipc)

@pytest.fixture(scope="module")
def tenants(world):
    """Task R owned by (and running as) root, task N owned by and running as uid 65534."""
    if os.getuid() != 0:
        pytest.skip("needs root to switch children to other uids")
    d, specs = world
    r = write_spec(specs, "tenant-root", 'pipeline = "text-embedding"')
    n = write_spec(specs, "tenant-nobody", f'pipeline = "text-embedding"\nowner = {NOBODY}')
    for p in (r, n):
        os.chmod(p, 0o644)
    procs = []
    try:
        procs.append(TaskProc(r, d.run_dir).start())
        procs.append(TaskAsUid(n, d.run_dir, NOBODY).start())
        yield d, RunDir(d.run_dir).endpoint(0, "tenant-root"), \
            RunDir(d.run_dir).endpoint(NOBODY, "tenant-nobody"), procs
    finally:
        for p in procs:
            p.stop()


def infer_as(uid: int, address: str, wait_ms: int, until: str = "") -> dict:
    arg = dict(address=address, wait_ms=wait_ms, until=until)
    return infer_once(arg) if uid == os.getuid() else run_as(uid, "infer", **arg)


def stat_of(path: str) -> tuple[int, int, bool]:
    st = os.stat(path)
    return st.st_uid, stat.S_IMODE(st.st_mode), stat.S_ISSOCK(st.st_mode)


def test_endpoint_files_belong_to_their_tenant(tenants):
    d, root_ep, nobody_ep, procs = tenants
    run = RunDir(d.run_dir)
    assert stat.S_IMODE(os.stat(os.path.join(d.run_dir, "tenants")).st_mode) == 0o711
    assert stat_of(run.tenant_dir(0))[:2] == (0, 0o700)
    assert stat_of(run.tenant_dir(NOBODY))[:2] == (NOBODY, 0o700)
    assert stat_of(socket_path(root_ep)) == (0, 0o600, True)
    assert stat_of(socket_path(nobody_ep)) == (NOBODY, 0o600, True)
    # The tenant's task process really runs as the tenant.
    with open(f"/proc/{procs[1].proc.pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert uids == [str(NOBODY)] * 4


def test_owner_and_root_reach_an_endpoint_other_tenants_do_not(tenants):
    d, root_ep, nobody_ep, _ = tenants
    ok = {"type": "infer_reply", "ref": 1, "shape": [1, HIDDEN], "code": None}
    assert infer_as(0, root_ep, WAIT_S * 1000)["reply"] == ok           # root: its own task
    assert infer_as(0, nobody_ep, WAIT_S * 1000)["reply"] == ok         # root: trusted
    assert infer_as(NOBODY, nobody_ep, WAIT_S * 1000)["reply"] == ok    # the owner
    # Other tenants: the filesystem stops them before any handshake (0700 dir, 0600 socket):
    # connect() fails (EACCES) and libzmq keeps retrying.
    for uid, ep in ((NOBODY, root_ep), (OTHER, nobody_ep)):
        got = infer_as(uid, ep, SILENCE_MS, until="CONNECT_RETRIED")
        assert got["reply"] is None, (uid, ep, got)
        assert "CONNECT_RETRIED" in got["events"] and "CONNECTED" not in got["events"], got


def test_endpoint_zap_refuses_other_tenants_even_with_open_permissions(tenants):
    d, root_ep, nobody_ep, _ = tenants
    run = RunDir(d.run_dir)
    opened = [(run.tenant_dir(0), 0o755), (socket_path(root_ep), 0o666),
              (run.tenant_dir(NOBODY), 0o755), (socket_path(nobody_ep), 0o666)]
    saved = [(p, stat.S_IMODE(os.stat(p).st_mode)) for p, _ in opened]
    try:
        for path, mode in opened:
            os.chmod(path, mode)
        for uid, ep in ((NOBODY, root_ep), (OTHER, nobody_ep)):
            got = infer_as(uid, ep, SILENCE_MS, until="HANDSHAKE_FAILED_AUTH")
            assert got["reply"] is None, (uid, ep, got)
            # It did connect this time; the task's ZAP policy refused the handshake.
            assert "CONNECTED" in got["events"] and "HANDSHAKE_FAILED_AUTH" in got["events"], got
        ok = {"type": "infer_reply", "ref": 1, "shape": [1, HIDDEN], "code": None}
        assert infer_as(0, root_ep, WAIT_S * 1000)["reply"] == ok
        assert infer_as(NOBODY, nobody_ep, WAIT_S * 1000)["reply"] == ok
    finally:
        for path, mode in saved:
            os.chmod(path, mode)


# ---------------------------------------------------------------- client endpoints (tcp + CURVE)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_tcp_endpoint_admits_only_authorized_curve_keys(world):
    d, specs = world
    good_pub, good_sec = zmq.curve_keypair()
    bad_pub, bad_sec = zmq.curve_keypair()
    address = f"tcp://127.0.0.1:{free_port()}"
    path = write_spec(specs, "curve-task", f'pipeline = "text-embedding"\n[endpoint]\n'
                                           f'tcp = "{address}"\n'
                                           f'authorized_keys = ["{good_pub.decode()}"]')
    task = TaskProc(path, d.run_dir).start()
    try:
        with d.client() as c:
            ep = c.control(Resolve(ref=c.ref(), name="curve-task"))
        assert ep.tcp_endpoint == address and len(ep.server_key) == 40
        server = ep.server_key
        ok = {"type": "infer_reply", "ref": 1, "shape": [1, HIDDEN], "code": None}
        good = infer_once(dict(address=address, wait_ms=WAIT_S * 1000,
                               curve=[server, good_pub.decode(), good_sec.decode()]))
        assert good["reply"] == ok
        bad = infer_once(dict(address=address, wait_ms=SILENCE_MS, until="HANDSHAKE_FAILED_AUTH",
                              curve=[server, bad_pub.decode(), bad_sec.decode()]))
        assert bad["reply"] is None and "HANDSHAKE_FAILED_AUTH" in bad["events"], bad
        plain = infer_once(dict(address=address, wait_ms=SILENCE_MS,         # no CURVE at all
                                until="HANDSHAKE_FAILED_PROTOCOL"))
        assert plain["reply"] is None and "HANDSHAKE_FAILED_PROTOCOL" in plain["events"], plain
        # The right client key against a wrong server key: CURVE itself fails.
        other_server = zmq.curve_keypair()[0].decode()
        spoofed = infer_once(dict(address=address, wait_ms=SILENCE_MS, until="DISCONNECTED",
                                  curve=[other_server, good_pub.decode(), good_sec.decode()]))
        assert spoofed["reply"] is None, spoofed
        assert "CONNECTED" in spoofed["events"] and "DISCONNECTED" in spoofed["events"], spoofed
        assert any(e.startswith("HANDSHAKE_FAILED") for e in spoofed["events"]), spoofed
        # The authorized client still gets answers afterwards; so does the ipc endpoint.
        assert infer_once(dict(address=address, wait_ms=WAIT_S * 1000,
                               curve=[server, good_pub.decode(), good_sec.decode()]))["reply"] == ok
        assert infer_once(dict(address=ep.address, wait_ms=WAIT_S * 1000))["reply"] == ok
    finally:
        task.stop()


# ---------------------------------------------------------------- supervisor: run as the owner

@needs_root
def test_supervisor_runs_a_deployed_task_as_its_owner(world):
    d, specs = world
    # The zygote forks the task and drops to the owner's uid after its imports, so the owner
    # needs no access to the interpreter's files (here /root is 0700), only to the spec.
    from ipc.messages import Deploy
    path = write_spec(specs, "deployed-nobody", f'pipeline = "text-embedding"\nowner = {NOBODY}')
    os.chmod(path, 0o644)
    with d.client() as c:
        with open(path) as f:
            c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)
        try:
            pid = {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}["deployed-nobody"].pid
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            assert uids == [str(NOBODY)] * 4
            assert c.infer("deployed-nobody", ["x"]).embeddings.shape == (1, HIDDEN)
        finally:
            c.control(RemoveTask(ref=c.ref(), name="deployed-nobody"))


# ---------------------------------------------------------------- listings and refusals, as a tenant

def table_names(text: str) -> set[str]:
    """Task names of `fmplex task list` / `fmplex top --once` (rows after the two header lines)."""
    return {line.split()[0] for line in text.splitlines()[2:] if line.strip()}


def test_a_tenant_lists_only_its_own_tasks_root_lists_all(tenants):
    d, _, _, _ = tenants
    with d.client() as c:
        everything = {t.name: t.owner_uid for t in c.control(ListTasks(ref=c.ref())).tasks}
    assert {"tenant-root", "tenant-nobody"} <= set(everything)          # root sees all
    owned = {n for n, uid in everything.items() if uid == NOBODY}
    for argv in (["task", "list"], ["top", "--once"]):
        mine = run_as(NOBODY, "cli", run=d.run_dir, argv=argv)
        assert mine["code"] == 0 and table_names(mine["out"]) == owned, mine
        stranger = run_as(OTHER, "cli", run=d.run_dir, argv=argv)       # owns nothing
        assert stranger["code"] == 0 and table_names(stranger["out"]) == set(), stranger
    info = run_as(NOBODY, "cli", run=d.run_dir, argv=["info"])
    assert info["code"] == 0 and "slot:tenant-nobody" in info["out"], info
    others = set(everything) - owned
    assert not any(name in info["out"] for name in others), info["out"]
    root_info = subprocess.run([sys.executable, "-m", "fmplex", "--run-dir", d.run_dir, "info"],
                               capture_output=True, text=True, timeout=WAIT_S, cwd=REPO)
    assert "slot:tenant-root" in root_info.stdout and "slot:tenant-nobody" in root_info.stdout


def test_a_foreign_task_is_refused_with_the_reason(tenants):
    d, _, _, _ = tenants
    for uid, task in ((NOBODY, "tenant-root"), (OTHER, "tenant-nobody")):
        got = run_as(uid, "cli", run=d.run_dir, argv=["infer", task, "hello"])
        assert got["code"] == 1, got
        assert got["err"].strip() == (f"fmplex: unauthorized: permission denied: task {task} "
                                      f"belongs to another owner"), got
    own = run_as(NOBODY, "cli", run=d.run_dir, argv=["infer", "tenant-nobody", "hello", "--json"])
    assert own["code"] == 0 and json.loads(own["out"])["task"] == "tenant-nobody", own
    with d.client() as c:                                                 # root reaches both
        assert c.control(Resolve(ref=c.ref(), name="tenant-nobody")).address.endswith(
            "tenant-nobody.sock")

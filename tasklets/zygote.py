"""The task zygote: a pre-imported template process that forks task processes.

fmplexd's supervisor starts one `python -m tasklets.zygote --fd N [--tokenizer PATH]...` (as the
daemon's user) and asks it, over the SOCK_SEQPACKET socket N, to fork each task process it
supervises. The zygote imports a task's whole import graph (numpy, pyzmq, uvloop, tokenizers, ipc,
tasklets) and loads the backbones' tokenizers once, freezes the garbage collector's view of those
objects (gc.freeze, so collections never write to them) and then only forks: a task's copy of the
interpreter, its modules and the tokenizer's vocabulary stays shared copy-on-write with the zygote
and with every other task, so a task's private memory is what it allocates itself (Android's zygote
pattern). Each child is still its own process: its own session, log, environment and, when the
zygote runs as root, the task owner's uid/gid (dropped before any task code runs). A crash in a
child is a crash of that task only. Trade-off (documented in docs/architecture.md): the children
share the zygote's address-space layout (ASLR is per zygote, not per task); set `task_zygote =
false` in fmplexd.toml to exec each task afresh instead.

Messages (ipc/messages.py through the one codec, one per datagram), daemon -> zygote: Spawn;
zygote -> daemon: ZygoteReady (once, after the preload), Spawned or Error (the answer to a spawn,
at once; a malformed request is answered with a typed Error carrying its ref when it has one),
ChildExit (a child ended; code < 0: killed by signal -code). A spawn's answer always precedes its
child's exit report. On EOF the zygote exits; its children live on (the daemon tracks them by
pidfd).
"""
from __future__ import annotations

import argparse
import gc
import os
import selectors
import signal
import socket
import sys
import traceback

from ipc.errors import ErrorCode, ProtocolError
from ipc.handles import HandlePlaneClosed, recv_message, send_message
from ipc.messages import ChildExit, Error, Spawn, Spawned, ZygoteReady

MAX_MESSAGE = 1 << 20


def preload(tokenizer_paths: list[str]) -> None:
    """Import everything a task process imports and load the tokenizers, then freeze."""
    import concurrent.futures.thread  # noqa: F401  (uvloop's loop imports it lazily)

    import ipc.aio  # noqa: F401  (the task's whole import graph, lazy imports included)
    import importlib

    import tasklets.process  # noqa: F401
    from tasklets.pipelines import MODULES
    from tasklets.pipelines.tokenizer_cache import preload_tokenizer
    for module in MODULES:
        importlib.import_module(module)
    for path in tokenizer_paths:
        preload_tokenizer(path)
    gc.collect()
    gc.freeze()


def serve(sock: socket.socket) -> int:
    """Answer spawn requests and report child exits until the daemon closes the socket."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    send_message(sock, ZygoteReady(pid=os.getpid()))
    while True:
        for key, _ in sel.select():
            if key.fileobj is wake_r:
                while True:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        break
                _reap(sock)
                continue
            try:
                req, fds = recv_message(sock, frozenset({Spawn}), max_fds=0, bufsize=MAX_MESSAGE)
            except HandlePlaneClosed:
                return 0                    # the daemon is gone; the children live on
            except ProtocolError as e:      # a malformed request is answered, never fatal
                send_message(sock, Error(getattr(e, "ref", 0), e.code, e.message))
                continue
            try:
                reply = _spawn(req, sock, (wake_r, wake_w))
            except Exception as e:          # a failed fork is answered, never fatal
                reply = Error(req.ref, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"[:4000])
            send_message(sock, reply)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        send_message(sock, ChildExit(pid=pid, code=os.waitstatus_to_exitcode(status)))


def _spawn(req: Spawn, sock: socket.socket, own_fds: tuple[int, int]) -> Spawned:
    log_fd = os.open(req.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                          # the task process
        code = 1
        try:
            code = _become_task(req, log_fd, sock, own_fds)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(log_fd)
    return Spawned(ref=req.ref, pid=pid)


def _become_task(req: Spawn, log_fd: int, sock: socket.socket, own_fds: tuple[int, int]) -> int:
    """In the child: drop everything of the zygote's, join the task's cgroups and lower its
    priority (while still privileged, before any thread exists), take the task's identity, run
    the task."""
    name, spec, env, uid, gid = req.name, req.spec, req.env, req.uid, req.gid
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock.close()
    for fd in own_fds:
        os.close(fd)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null)
    os.close(log_fd)
    for path in req.cgroups:
        try:
            with open(path, "w") as f:
                f.write("0")                              # 0: the writing process
        except OSError as e:
            print(f"fmplex-task {name}: cannot join cgroup {path}: {e}", file=sys.stderr)
    if req.nice:
        os.nice(req.nice)
    if uid is not None:                                   # as the task's owner: for good
        os.setgroups([])
        os.setgid(int(gid if gid is not None else uid))
        os.setuid(int(uid))
    os.environ.clear()
    os.environ.update(env)
    _set_title(f"fmplex-task {name}".encode()[:15])
    sys.argv = [sys.argv[0], spec, "--supervised"]
    from tasklets.process import main
    return main(spec)


def _set_title(comm: bytes) -> None:
    """Name the process (what `ps -e`, `top` and psutil's name() show) after its task."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(comm), 0, 0, 0)      # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description="fmplexd's task zygote (started by the daemon)")
    ap.add_argument("--fd", type=int, required=True, help="the SOCK_SEQPACKET socket to serve")
    ap.add_argument("--tokenizer", action="append", default=[], help="a tokenizer.json to preload")
    args = ap.parse_args()
    sock = socket.socket(fileno=args.fd)
    preload(args.tokenizer)
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main())

"""fmplexd: the backbone daemon's composition root and its loops.

Loops (all in one uvloop event loop; the forward runs in one worker thread so the loop keeps
answering heartbeats and control requests meanwhile):
    serve_tasks    receive task-plane messages  -> task_plane.handle
    serve_control  receive control messages     -> control.handle
    engine_loop    form batch -> run -> deliver  (collect happens in serve_tasks)
    housekeeping   heartbeats out, liveness in, deadline expiry
Signal handlers only set `stopping`; shutdown drains in-flight work, tells tasks, and exits.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq
import zmq.asyncio

from fmplexd import control, handle_plane, lifecycle, task_plane
from fmplexd.backbone import Backbone, embedded_backbone_path, load_backbone
from fmplexd.config import DaemonConfig
from fmplexd.engine import Engine, Pending, release
from fmplexd.registry import Registry, TaskEntry
from ipc import codec, transport
from ipc.addresses import RunDir
from ipc.errors import ErrorCode, FmplexError
from ipc.handles import HandleServer
from ipc.messages import Error, Heartbeat, Message, Result, TaskState
from ipc.zap import ZapRequest, ZapServer

log = logging.getLogger("fmplexd")
STALLED_FORWARD_S = 60.0      # a forward running longer than this is wedged
STALL_LOG_S = 1.0             # a housekeeping tick this late is logged


class Daemon:
    def __init__(self, config: DaemonConfig, notify=None):
        self.config = config
        self.notify = notify or (lambda **kw: None)
        self.run_dir = RunDir(config.run_dir)
        self.epoch = transport.new_epoch()
        self.started = time.monotonic()
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 2) - 1))
        self.backbones: dict[str, Backbone] = {}
        for b in config.backbones:
            self.notify(status=f"loading backbone {b.name}", extend_timeout_s=120)
            path = embedded_backbone_path() if b.path == "embedded" else b.path
            self.backbones[b.name] = load_backbone(b.name, path, b.dtype)
        self.engines = {name: Engine(bb, config.token_budget, config.max_batch_requests,
                                     config.max_request_tokens, config.batch_target_ms / 1e3,
                                     config.idle_credit_tokens)
                        for name, bb in self.backbones.items()}
        for name, engine in self.engines.items():
            engine.warm_up()
            log.info("backbone %s: %.0f tokens/s at start, batch budget %d tokens", name,
                     engine.tokens_per_s, engine.scheduler.token_budget)
        self.registry = Registry()
        self.liveness = transport.Liveness(config.liveness_ms / 1e3)
        self.relays: dict[int, tuple] = {}   # command ref -> (operator, its ref, sent at, task)
        self.supervisor = None          # set by run() (fmplexd.supervisor)
        self.ready_waiters: dict[str, list[asyncio.Future]] = {}
        self.stopping = False
        self.failed = False
        self.wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.ctx = zmq.asyncio.Context()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fmplexd-forward")
        self.in_flight = 0
        self.batch_started = 0.0
        self._next_ref = 1 << 40

    # -- set-up and shutdown ----------------------------------------------------------------

    async def run(self) -> None:
        from fmplexd.supervisor import Supervisor
        os.makedirs(self.run_dir.path, mode=0o755, exist_ok=True)
        os.makedirs(os.path.join(self.run_dir.path, "tenants"), mode=0o711, exist_ok=True)
        self.zap = ZapServer(self.ctx, _peer_uid)
        self.zap.start()
        self.tasks_sock = transport.router(self.ctx, self.run_dir.tasks, zap_domain=b"tasks")
        self.control_sock = transport.router(self.ctx, self.run_dir.control, zap_domain=b"control",
                                             max_msg_bytes=2 * codec.MAX_HEADER_BYTES)
        for addr in (self.run_dir.tasks, self.run_dir.control):
            os.chmod(addr[len("ipc://"):], 0o666)
        self.handles = HandleServer(self.run_dir.handles, handle_plane.make_handler(self),
                                    handle_plane.make_on_close(self))
        self.handles.start()
        self.supervisor = Supervisor(self)
        self.supervisor.restore()
        loops = [asyncio.create_task(c) for c in (
            self.serve_tasks(), self.serve_control(), self.engine_loop(), self.housekeeping())]
        for t in loops:
            t.add_done_callback(self._loop_ended)
        self.notify(ready=True, status=f"serving {len(self.backbones)} backbone(s)")
        log.info("fmplexd ready in %s (epoch %x)", self.run_dir.path, self.epoch)
        try:
            await self._stopped()
        finally:
            self.notify(stopping=True, status="draining")
            await self.shutdown(loops)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """A loop must never end on its own: log why, and stop the daemon (exit status 1) so that
        systemd restarts it rather than leaving a half-working daemon."""
        if task.cancelled() or self.stopping:
            return
        log.critical("daemon loop %s ended", task.get_coro().__name__, exc_info=task.exception())
        self.failed = True
        self.request_stop()

    async def _stopped(self) -> None:
        await self._stop.wait()

    def request_stop(self) -> None:
        """Signal handlers call only this."""
        self.stopping = True
        self._stop.set()
        self.wake.set()

    async def shutdown(self, loops: list[asyncio.Task]) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.in_flight or any(e.scheduler.queued for e in self.engines.values()):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        await self.supervisor.stop_all()
        for entry in list(self.registry.by_name.values()):
            lifecycle.end_session(self, entry, ErrorCode.SHUTTING_DOWN, "daemon shutting down",
                                   TaskState.STOPPED)
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        self.handles.close()
        self.zap.close()
        self.tasks_sock.close()
        self.control_sock.close()
        self.ctx.term()
        self.pool.shutdown(wait=True)

    # -- loops --------------------------------------------------------------------------------

    async def serve_tasks(self) -> None:
        while True:
            env = await transport.recv(self.tasks_sock, router_side=True)
            task_plane.handle(self, env, time.monotonic())

    async def serve_control(self) -> None:
        while True:
            env = await transport.recv(self.control_sock, router_side=True)
            await control.handle(self, env)

    async def engine_loop(self) -> None:
        """form batch -> run -> deliver, round-robin over backbones."""
        loop = asyncio.get_running_loop()
        while True:
            ran = False
            for engine in self.engines.values():
                batch = engine.scheduler.form_batch(time.monotonic(), engine.horizon())
                self.answer_expired(batch.expired)
                items, pendings = engine.work(batch)
                if not items:
                    continue
                ran = True
                self.in_flight += 1
                t0 = self.batch_started = time.monotonic()
                try:
                    outs = await loop.run_in_executor(self.pool, engine.executor.run, items)
                except Exception as e:      # a bug in the forward must not stop the daemon
                    log.exception("forward failed")
                    outs = [FmplexError(ErrorCode.INTERNAL, f"forward failed: {e}")] * len(items)
                finally:
                    self.in_flight -= 1
                    release(pendings)
                t1 = time.monotonic()
                engine.observe(batch.tokens, t1 - t0)
                self.deliver(pendings, outs, t0, t1)
                lifecycle.ack_drained_commits(self)
            if not ran:
                self.wake.clear()
                await self.wake.wait()

    async def housekeeping(self) -> None:
        period = self.config.heartbeat_ms / 1e3
        tick = min(period, 0.05)
        seq, last_beat, last_tick, grace_until = 0, 0.0, time.monotonic(), 0.0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last_tick > tick + period:
                # The loop itself stalled: heartbeats may be waiting unread in the socket. Judge
                # liveness again only after the task plane had time to drain.
                grace_until = now + 2 * period
                if now - last_tick > STALL_LOG_S:      # an operator's clue (GIL, CPU starvation)
                    log.warning("event loop stalled for %.1fs (heartbeats and replies waited)",
                                now - last_tick)
            last_tick = now
            for engine in self.engines.values():
                self.answer_expired(engine.scheduler.expire(now))
            if now >= grace_until:
                for session in self.liveness.expired(now):
                    entry = self.registry.by_session.get(session)
                    if entry is not None:
                        lifecycle.task_died(self, entry, "heartbeat timeout")
            if now - last_beat >= transport.DAEMON_BEAT_PERIODS * period:
                last_beat = now
                seq += 1
                for entry in list(self.registry.by_name.values()):
                    if entry.identity is not None:
                        self.send_task(entry, Heartbeat(epoch=entry.session, seq=seq))
            control.expire_relays(self, now)
            if not self.in_flight or now - self.batch_started < STALLED_FORWARD_S:
                self.notify(watchdog=True)      # a wedged forward stops the watchdog: restart us

    # -- replies ------------------------------------------------------------------------------

    def deliver(self, pendings: list[Pending], outs: list, t0: float, t1: float) -> None:
        run_ms = (t1 - t0) * 1e3
        for p, out in zip(pendings, outs):
            entry = p.entry
            if entry.session != p.session:          # the task died or re-registered meanwhile
                continue
            if isinstance(out, FmplexError):
                entry.errors += 1
                self.send_task(entry, Error(p.msg.ref, out.code, out.message, epoch=p.session))
                continue
            entry.requests += 1
            entry.latency.add(t1 - p.arrival, t1)
            self.send_task(entry, Result(epoch=p.session, ref=p.msg.ref, version=p.view.version,
                                         output=p.msg.output, data=out,
                                         queue_ms=max(0.0, (t0 - p.arrival) * 1e3), run_ms=run_ms))

    def answer_expired(self, expired: list) -> None:
        for req in expired:
            p: Pending = req.payload
            if p.entry.session == p.session:
                p.entry.timeouts += 1
                self.send_task(p.entry, Error(p.msg.ref, ErrorCode.TIMEOUT,
                                              "deadline passed before execution", epoch=p.session))

    def send_task(self, entry: TaskEntry, msg: Message) -> bool:
        """Send to a task's process; a gone peer means the task died."""
        if entry.identity is None:
            return False
        try:
            transport.send(self.tasks_sock, msg, entry.identity)
            return True
        except transport.PeerGone:
            lifecycle.task_died(self, entry, "task-plane peer gone")
        except transport.PeerBusy:
            log.warning("task %s is not reading its results; dropping a message", entry.name)
        return False

    def task_ready(self, name: str) -> None:
        """A task committed and serves: wake whoever waits for it."""
        if self.supervisor is not None:
            self.supervisor.ready(name)
        for fut in self.ready_waiters.pop(name, []):
            if not fut.done():
                fut.set_result(True)

    def new_ref(self) -> int:
        self._next_ref += 1
        return self._next_ref


def _peer_uid(req: ZapRequest) -> str | None:
    """ZAP policy of the daemon's sockets: every local peer may connect; its uid is recorded and
    authorisation is decided per message (registration checks the task's owner)."""
    uid = req.ipc_uid
    return None if uid is None else str(uid)

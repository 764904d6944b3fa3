"""fmplexd: the backbone daemon's composition root and its loops.

Built here, each with only what it needs:
    engine      Engine(backbones): scheduler + one runner per backbone (of its family)
    sessions    Sessions(engine, authority): the task records, liveness, slots, versions
    supervisor  Supervisor: deployed task processes (forked by the task zygote)
    handlers    TaskPlane, ControlApi, HandlePolicy: one per socket, given a reply callable
Loops (one uvloop event loop; forwards run in worker threads so the loop keeps answering
heartbeats and control requests meanwhile):
    serve_tasks    receive task-plane messages  -> TaskPlane.handle
    serve_control  receive control messages     -> ControlApi.handle
    lane x N       next work -> run -> finish -> deliver   (arrivals come through serve_tasks)
                   N executor lanes (config executor_lanes, one per core by default), each a
                   worker thread running its own batch with `threads` intra-op threads over the
                   same shared weights: every core computes forwards, none is oversubscribed
                   (on a GPU the same shape maps to CUDA streams).
    housekeeping   heartbeats out, liveness in, deadline expiry, relay expiry, watchdog
Metrics (fmplexd.metrics): Prometheus at `metrics_listen`, fed by the sessions' observer hook and
each batch of the lanes, the rest read from the daemon's figures at scrape time.
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

from fmplexd.auth import Authority
from fmplexd.cgroups import TaskCgroups
from fmplexd.config import DaemonConfig
from fmplexd.control import ControlApi, DaemonFacts
from fmplexd.engine import Engine
from fmplexd.families import load_backbone
from fmplexd.handle_plane import HandlePolicy
from fmplexd.metrics import DaemonMetrics, Snapshot
from fmplexd.progress import Progress
from fmplexd.relays import Relays
from fmplexd.sessions import Sessions
from fmplexd.supervisor import Supervisor
from fmplexd.task_plane import TaskPlane
from ipc import codec, transport
from ipc.addresses import RunDir
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.handles import HandleServer
from ipc.messages import PROTOCOL_VERSION, Hello, Message, RegionInfo, TaskState, Welcome
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
        backbones, progress = {}, Progress(self.notify)
        for i, b in enumerate(config.backbones):
            what = f"loading backbone {b.name} ({i + 1}/{len(config.backbones)})"
            progress(what, stage=what, extend_timeout_s=120)
            workdir = os.path.join(self.run_dir.path, "backbones", b.name)
            backbones[b.name] = load_backbone(
                b.name, b.path, b.dtype, workdir,
                progress=lambda step, what=what: progress(f"{what}: {step}", stage=what))
        self.backbones = backbones
        progress("warming up the executors", stage="warm-up")
        self.engine = Engine(backbones, config)
        self.lanes, threads = config.lanes_and_threads(
            any(r.concurrent for r in self.engine.runners.values()))
        torch.set_num_threads(threads)
        self.engine.warm_up()
        progress.done(f"loaded {len(backbones)} backbone(s)")
        self._status = ""
        self.authority = Authority(config.trust_root)
        self.sessions = Sessions(self.engine, self.authority, self.run_dir, config.heartbeat_ms,
                                 config.liveness_ms, config.keep_slot_on_death)
        self.metrics = DaemonMetrics()
        self.sessions.observe(self.metrics)
        self.stopping = False
        self.failed = False
        self.wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.ctx = zmq.asyncio.Context()
        self.pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="fmplexd-forward")
        self.in_flight = 0
        self.batch_started: dict[int, float] = {}     # lane -> when its forward started

    # -- set-up and shutdown ----------------------------------------------------------------

    async def run(self) -> None:
        os.makedirs(self.run_dir.path, mode=0o755, exist_ok=True)
        os.makedirs(os.path.join(self.run_dir.path, "tenants"), mode=0o711, exist_ok=True)
        self.zap = ZapServer(self.ctx, _peer_uid)
        self.zap.start()
        self.tasks_sock = transport.router(self.ctx, self.run_dir.tasks, zap_domain=b"tasks")
        self.control_sock = transport.router(self.ctx, self.run_dir.control, zap_domain=b"control",
                                             max_msg_bytes=2 * codec.MAX_HEADER_BYTES)
        for addr in (self.run_dir.tasks, self.run_dir.control):
            os.chmod(addr[len("ipc://"):], 0o666)
        self.sessions.attach(lambda identity, msg: transport.send(self.tasks_sock, msg, identity))
        cgroups = TaskCgroups.detect(self.config.task_cgroups)
        if cgroups is not None:
            log.info("task processes get their own cgroups (%s)", cgroups.describe())
        self.supervisor = Supervisor(self.run_dir, self.config.state_dir, self.authority,
                                     self.config.task_zygote,
                                     [i.tokenizer for i in self.engine.infos() if i.tokenizer],
                                     self.config.task_nice, cgroups)
        self.sessions.subscribe(self.supervisor)
        relays = Relays(self._reply_control)
        self.task_plane = TaskPlane(self.sessions, relays, self._welcome, self._reply_task,
                                    lambda: self.stopping, self.wake.set)
        self._serve_metrics()
        facts = DaemonFacts(self.epoch, self.started, self.run_dir.path, self.engine.infos,
                            self._backbone_regions, self.engine.load, lambda: self.metrics.url)
        self.control = ControlApi(self.sessions, relays, facts, self._welcome,
                                  self.supervisor.deploy, self.supervisor.forget,
                                  self._reply_control, lambda: self.stopping)
        self.relays = relays
        policy = HandlePolicy(self.sessions, self.backbones.__getitem__)
        self.handles = HandleServer(self.run_dir.handles, policy.handle, policy.closed)
        self.handles.start()
        self.supervisor.restore()
        loops = [asyncio.create_task(c) for c in (
            self.serve_tasks(), self.serve_control(), self.housekeeping(),
            *(self.lane(i) for i in range(self.lanes)))]
        for t in loops:
            t.add_done_callback(self._loop_ended)
        self._status = f"serving {len(self.backbones)} backbone(s)"
        self.notify(ready=True, status=self._status)
        log.info("fmplexd ready in %s (epoch %x)", self.run_dir.path, self.epoch)
        try:
            await self._stop.wait()
        finally:
            self.notify(stopping=True, status="draining")
            await self.shutdown(loops)

    def _serve_metrics(self) -> None:
        """Prometheus at `metrics_listen`; a failure to bind is logged, and serving goes on."""
        if not self.config.metrics_listen:
            return
        try:
            url = self.metrics.serve(self.config.metrics_listen, self._metrics_snapshot,
                                     asyncio.get_running_loop())
            log.info("metrics at %s", url)
        except OSError as e:
            log.error("no metrics: cannot listen at %s (%s)", self.config.metrics_listen, e)

    def _metrics_snapshot(self) -> Snapshot:
        now = time.monotonic()
        return Snapshot(tasks=self.sessions.stats(now), backbones=self.engine.load(),
                        region_bytes={n: b.manifest.size for n, b in self.backbones.items()},
                        uptime_s=now - self.started)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """A loop must never end on its own: log why, and stop the daemon (exit status 1) so that
        systemd restarts it rather than leaving a half-working daemon."""
        if task.cancelled() or self.stopping:
            return
        log.critical("daemon loop %s ended", task.get_coro().__name__, exc_info=task.exception())
        self.failed = True
        self.request_stop()

    def request_stop(self) -> None:
        """Signal handlers call only this."""
        self.stopping = True
        self._stop.set()
        self.wake.set()

    async def shutdown(self, loops: list[asyncio.Task]) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.in_flight or self.engine.queued:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        self.metrics.close()
        await self.supervisor.stop_all()
        self.sessions.end_all(ErrorCode.SHUTTING_DOWN, "daemon shutting down")
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
            self.task_plane.handle(env, time.monotonic())

    async def serve_control(self) -> None:
        while True:
            env = await transport.recv(self.control_sock, router_side=True)
            await self.control.handle(env)

    async def lane(self, lane: int) -> None:
        """One executor lane: next work -> run (in a worker thread) -> finish -> deliver. Every
        lane takes the next work as soon as it is free; `wake` (an arrival, or a lane that
        finished: a decoder's next iteration may be formed now) sends idle lanes looking."""
        loop = asyncio.get_running_loop()
        while True:
            work, late = self.engine.next_work(time.monotonic())
            self.sessions.deliver(late, time.monotonic())
            if work is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            self.in_flight += 1
            t0 = self.batch_started[lane] = time.monotonic()
            try:
                outputs = await loop.run_in_executor(self.pool, self.engine.run, work)
            except Exception as e:      # a bug in the forward must not stop the daemon
                log.exception("forward failed")
                outputs = FmplexError(ErrorCode.INTERNAL, f"forward failed: {e}")
            finally:
                self.in_flight -= 1
                del self.batch_started[lane]
            t1 = time.monotonic()
            self.metrics.batch(work.batch.group, work.tokens, t1 - t0)
            self.sessions.deliver(self.engine.finish(work, outputs, t0, t1), t1)
            self.sessions.ack_drained()
            if self.lanes > 1:
                self.wake.set()

    async def housekeeping(self) -> None:
        period = self.config.heartbeat_ms / 1e3
        tick = min(period, 0.05)
        last_beat, last_tick, grace_until = 0.0, time.monotonic(), 0.0
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
            self.sessions.deliver(self.engine.expire(now), now)
            if now >= grace_until:
                self.sessions.expire_silent(now)
            if now - last_beat >= transport.DAEMON_BEAT_PERIODS * period:
                last_beat = now
                self.sessions.heartbeat()
            self.relays.expire(now)
            self._tell_status()
            if all(now - t0 < STALLED_FORWARD_S for t0 in self.batch_started.values()):
                self.notify(watchdog=True)      # a wedged forward stops the watchdog: restart us

    def _tell_status(self) -> None:
        """systemd's STATUS= while serving: the tasks ready of those known (deploying many tasks,
        or restoring them after a restart, shows as it goes); sent only when it changes."""
        tasks = self.sessions.entries()
        ready = sum(e.state is TaskState.READY for e in tasks)
        status = (f"serving {len(self.backbones)} backbone(s); tasks: {ready} ready"
                  + (f", {len(tasks) - ready} not ready" if len(tasks) > ready else ""))
        if status != self._status:
            self._status = status
            self.notify(status=status)

    # -- replies ------------------------------------------------------------------------------

    def _welcome(self, msg: Hello) -> Welcome:
        if msg.proto != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"protocol {msg.proto} is not "
                                f"supported (this daemon speaks {PROTOCOL_VERSION})")
        return Welcome(ref=msg.ref, proto=PROTOCOL_VERSION, epoch=self.epoch,
                       heartbeat_ms=self.config.heartbeat_ms, backbones=self.engine.infos())

    def _backbone_regions(self) -> list[RegionInfo]:
        return [RegionInfo(name=f"backbone:{b.name}", kind="backbone", bytes=b.manifest.size)
                for b in self.backbones.values()]

    def _reply_task(self, identity: bytes | None, msg: Message) -> None:
        if identity is None:
            return
        try:
            transport.send(self.tasks_sock, msg, identity)
        except (transport.PeerGone, transport.PeerBusy):
            pass     # the sender is gone; its session (if any) ends through liveness or the handle plane

    def _reply_control(self, identity: bytes, msg: Message) -> None:
        try:
            transport.send(self.control_sock, msg, identity)
        except (transport.PeerGone, transport.PeerBusy):
            pass


def _peer_uid(req: ZapRequest) -> str | None:
    """ZAP policy of the daemon's sockets: every local peer may connect; its uid is recorded and
    authorisation is decided per message (fmplexd.auth)."""
    uid = req.ipc_uid
    return None if uid is None else str(uid)

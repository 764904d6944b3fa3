"""The task process (`python -m tasklets SPEC`, also `fmplex task run SPEC`): one task's virtual
foundation model.

It loads and validates its extension, registers with fmplexd, writes the extension into its slot,
binds its client endpoint and serves: tokenize -> Submit -> Result -> post-process -> reply.
It reconnects and re-registers by itself when the daemon restarts, and carries out the operator's
lifecycle commands relayed by the daemon:
    update   (canary_percent = 0)  hot-swap to a new extension version; a failure keeps the old one
    update   (canary_percent > 0)  stage the new version as `NAME@canary` and route that share of
                                   requests to it (its stats are its own task entry in the daemon)
    promote / rollback             make the canary the only version / drop it
    stop                           unregister and exit
With `cache_mb` in the spec, repeated deterministic requests are answered from the process's own
result cache (tasklets.cache), keyed by version and emptied on update, promote, rollback and
re-registration; its counts go to the daemon (CacheStats) once per heartbeat period when they
changed. Standard task processes never import torch.
"""
from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
from dataclasses import dataclass

import zmq.asyncio

from ipc.addresses import RunDir, default_run_dir
from ipc.errors import TASK_EXIT_PREFIX, ErrorCode, FmplexError, ProtocolError
from ipc.messages import (PROTOCOL_VERSION, BackboneInfo, CacheStats, Command, Error, HeadInput,
                          Message, Ok, Op)
from ipc.spec import TaskSpec, load_spec, parse_spec
from tasklets.adapters import Extension, build_extension, validate
from tasklets.cache import ResultCache, replay
from tasklets.daemon_link import DaemonLink, DaemonLost, Session, SessionCall
from tasklets.endpoint import ClientChannel, ClientEndpoint
from tasklets.pipelines import Pipeline, make_pipeline

log = logging.getLogger("fmplex.task")
RECONNECT_TIMEOUT_S = 3600.0
RECONNECT_GRACE_S = 2.0          # a request waits this long for a reconnect before failing
CANARY = "canary"


@dataclass(slots=True, eq=False)
class Variant:
    """One live version of the task: its spec, extension, pipeline and daemon session."""
    name: str                    # "sentiment" or "sentiment@canary"
    spec: TaskSpec
    ext: Extension
    pipeline: Pipeline
    session: Session | None = None


def load_extension(spec: TaskSpec, info: BackboneInfo) -> Extension:
    """Read the spec's extension sources and check them against the backbone (shapes, labels)."""
    ext = build_extension(info.targets, spec.adapter, spec.head, spec.pooling,
                          spec.pipeline.head_input or HeadInput.POOLED, spec.head_activation)
    validate(ext, info)
    head = ext.spec.head
    if head is not None and spec.labels and head.num_labels != len(spec.labels):
        raise FmplexError(ErrorCode.INVALID_EXTENSION, f"the head has {head.num_labels} outputs "
                          f"but the spec lists {len(spec.labels)} labels")
    return ext


class TaskProcess:
    def __init__(self, spec: TaskSpec, run_dir: RunDir):
        self.spec, self.run_dir = spec, run_dir
        self.address = run_dir.endpoint(spec.owner_uid, spec.name)
        self.main: Variant | None = None
        self.canary: Variant | None = None
        self.canary_percent = 0
        self.link: DaemonLink | None = None
        self.endpoint: ClientEndpoint | None = None
        self.stop = asyncio.Event()
        self.registered = asyncio.Event()      # set while the main version holds a session
        self.cache = ResultCache(int(spec.cache_mb * 2**20)) if spec.cache_mb > 0 else None
        self._reported: dict[int, tuple] = {}  # session epoch -> the counts it was told last
        self._rng = random.Random()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        self.link = await self._connect(timeout_s=30.0)
        self.main = self._variant(self.spec.name, self.spec, self.link.welcome)
        self.endpoint = ClientEndpoint(zmq.asyncio.Context(), self.address, self.spec.owner_uid,
                                       self.handle, self.main.pipeline.accepts, self.spec.tcp,
                                       self.spec.authorized_keys,
                                       max_in_flight=max(16, 2 * self.spec.queue_limit))
        await self._register(self.main)
        self.registered.set()
        self.endpoint.start()
        log.info("task %s serving at %s (version %d)", self.spec.name, self.address,
                 self.main.session.version)
        watchers = [loop.create_task(self._reconnect_forever())]
        if self.cache is not None:
            watchers.append(loop.create_task(self._report_cache()))
        await self.stop.wait()
        for w in watchers:
            w.cancel()
        await self._shutdown()

    # -- serving ------------------------------------------------------------------------------

    async def handle(self, msg: Message, client: ClientChannel) -> Message:
        """One client request: pick the version (main or canary), wait out a reconnect, and run
        the pipeline within the request's deadline."""
        if getattr(msg, "proto", 0) and msg.proto != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"protocol {msg.proto} is not supported "
                                f"(this task speaks {PROTOCOL_VERSION})")
        variant = self.main
        if self.canary is not None and self._rng.random() * 100 < self.canary_percent:
            variant = self.canary
        deadline_ms = getattr(msg, "timeout_ms", 0) or variant.spec.deadline_ms
        if not self.registered.is_set():         # reconnecting: wait a little, then say so
            try:
                await asyncio.wait_for(self.registered.wait(),
                                       min(RECONNECT_GRACE_S, deadline_ms / 1e3))
            except asyncio.TimeoutError:
                raise FmplexError(ErrorCode.DAEMON_UNAVAILABLE, "reconnecting to the daemon") from None
        session = variant.session
        if session is None:                       # a canary dropped while we waited
            variant, session = self.main, self.main.session
        call = SessionCall(self.link, session, variant.name)
        version, key = session.version, self._cache_key(variant, session.version, msg)
        if key is not None:
            hit = self.cache.get(key, variant.name, msg.ref)
            if hit is not None:
                replay(hit, msg, client.send)
                return hit
        call.reserve()                       # no room in the daemon's queue: refused before work
        try:
            reply = await asyncio.wait_for(variant.pipeline.serve(msg, call, client, deadline_ms),
                                           deadline_ms / 1e3)
        except asyncio.TimeoutError:
            raise FmplexError(ErrorCode.TIMEOUT, f"no result within {deadline_ms} ms") from None
        finally:
            call.release()
        if key is not None and getattr(reply, "version", None) == version:
            self.cache.put(key, variant.name, reply)       # (a version committed meanwhile: not)
        return reply

    def _cache_key(self, variant: Variant, version: int, msg: Message) -> bytes | None:
        if self.cache is None:
            return None
        return self.cache.key(variant.name, version, variant.spec.pipeline.value, msg,
                              greedy_default=variant.spec.generation.temperature == 0)

    async def _report_cache(self) -> None:
        """Each heartbeat period: every variant's cache counts, to its session, if they changed."""
        while True:
            await asyncio.sleep(self.link.welcome.heartbeat_ms / 1e3)
            for v in (self.main, self.canary):
                if v is None or v.session is None:
                    continue
                c = self.cache.counts[v.name]
                now = (c.hits, c.misses, c.entries, c.bytes)
                if self._reported.get(v.session.epoch) == now:
                    continue
                try:
                    self.link.notify(CacheStats(epoch=v.session.epoch, hits=c.hits,
                                                misses=c.misses, entries=c.entries, bytes=c.bytes))
                    self._reported[v.session.epoch] = now
                except FmplexError:
                    pass                               # reconnecting: told to the next session

    # -- daemon connection --------------------------------------------------------------------

    async def _connect(self, timeout_s: float) -> DaemonLink:
        link = DaemonLink(self.run_dir, on_command=self._on_command)
        try:
            welcome = await link.open(timeout_s)
        except BaseException:
            await link.close()
            raise
        if not any(b.name == self.spec.backbone for b in welcome.backbones):
            await link.close()
            raise FmplexError(ErrorCode.INVALID_INPUT, f"the daemon has no backbone "
                              f"{self.spec.backbone!r}")
        return link

    def _variant(self, name: str, spec: TaskSpec, welcome) -> Variant:
        info = next(b for b in welcome.backbones if b.name == spec.backbone)
        if info.family is not spec.pipeline.family:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"a {spec.pipeline.value} task needs a "
                              f"{spec.pipeline.family.value} backbone; {info.name} is a "
                              f"{info.family.value} backbone")
        ext = load_extension(spec, info)
        return Variant(name, spec, ext, make_pipeline(spec, info, ext.spec.prompt_tokens))

    async def _register(self, v: Variant) -> None:
        if self.cache is not None:                 # a new session: its counts start at zero,
            self.cache.clear()                     # and nothing older is served
            self.cache.counts.pop(v.name, None)
        variant = v.name.partition("@")[2]
        v.session = await self.link.register(
            v.spec.task_config(variant), v.ext.spec, v.ext.tensors, endpoint=self.address,
            tcp_endpoint=self.spec.tcp, server_key=self.endpoint.public_key)

    async def _reconnect_forever(self) -> None:
        while True:
            await self.link.lost.wait()
            log.warning("daemon lost (%s); reconnecting", self.link.lost_reason)
            self.registered.clear()
            for v in (self.main, self.canary):
                if v is not None:
                    v.session = None
            await self.link.close()
            while True:
                try:
                    self.link = await self._connect(RECONNECT_TIMEOUT_S)
                    for v in (self.main, self.canary):
                        if v is not None:
                            await self._register(v)
                    log.info("re-registered %s with the new daemon", self.spec.name)
                    self.registered.set()
                    break
                except (DaemonLost, FmplexError, TimeoutError) as e:
                    log.warning("re-registration failed (%s); retrying", e)
                    await self.link.close()
                    await asyncio.sleep(0.1)

    # -- operator commands --------------------------------------------------------------------

    async def _on_command(self, session: Session, cmd: Command) -> None:
        try:
            await asyncio.wait_for(self.registered.wait(), 30)   # a command may beat our Committed
            message = await self._command(cmd)
            if self.cache is not None and cmd.op is not Op.STOP:
                self.cache.clear()                 # update, promote, rollback: new answers
            self.link.reply(Ok(ref=cmd.ref, message=message))
        except FmplexError as e:
            self.link.reply(Error(cmd.ref, e.code, e.message, epoch=cmd.epoch))
        except Exception as e:
            log.exception("command %s failed", cmd.op.value)
            self.link.reply(Error(cmd.ref, ErrorCode.INTERNAL, repr(e)[:500], epoch=cmd.epoch))

    async def _command(self, cmd: Command) -> str:
        if cmd.op is Op.STOP:
            self.stop.set()
            return "stopping"
        if cmd.op is Op.ROLLBACK:
            await self._drop_canary()
            return f"rolled back to version {self.main.session.version}"
        if cmd.op is Op.PROMOTE:
            if self.canary is None:
                raise FmplexError(ErrorCode.INVALID_INPUT, "there is no canary to promote")
            return await self._swap_main(self.canary.spec, drop_canary=True)
        spec = parse_spec(cmd.spec, base_dir=cmd.spec_dir or None) if cmd.spec else self.spec
        if spec.name != self.spec.name or spec.owner_uid != self.spec.owner_uid:
            raise FmplexError(ErrorCode.INVALID_INPUT, "an update may not change name or owner")
        if cmd.canary_percent == 0:
            return await self._swap_main(spec, drop_canary=False)
        variant = self._variant(f"{spec.name}@{CANARY}", spec, self.link.welcome)
        await self._drop_canary()
        await self._register(variant)
        self.canary, self.canary_percent = variant, cmd.canary_percent
        return f"canary version {variant.session.version} takes {cmd.canary_percent}% of requests"

    async def _swap_main(self, spec: TaskSpec, drop_canary: bool) -> str:
        """Hot-swap the main version; on any failure the old version keeps serving."""
        staged = self._variant(spec.name, spec, self.link.welcome)     # raises on a bad extension
        await self.link.update(self.main.session, staged.ext.spec, staged.ext.tensors)
        staged.session = self.main.session
        self.main = staged
        if drop_canary:
            await self._drop_canary()
        return f"now serving version {self.main.session.version}"

    async def _drop_canary(self) -> None:
        canary, self.canary, self.canary_percent = self.canary, None, 0
        if canary is not None and canary.session is not None:
            try:
                await self.link.unregister(canary.session)
            except FmplexError as e:
                log.warning("could not unregister the canary: %s", e)

    async def _shutdown(self) -> None:
        for v in (self.canary, self.main):
            if v is not None and v.session is not None and not self.link.lost.is_set():
                try:
                    await self.link.unregister(v.session)
                except (FmplexError, TimeoutError):
                    pass            # the daemon ends the session anyway when we disconnect
        await self.endpoint.close()
        await self.link.close()


def main(spec_path: str, run_dir: str | None = None) -> int:
    """Entry point of a task process. Exits 2 with `fmplex-task-error: CODE: message` on stderr
    when the task cannot start (the supervisor reports that line as the deploy's error)."""
    from ipc import aio
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        spec = load_spec(spec_path)
        aio.run(TaskProcess(spec, RunDir(run_dir or default_run_dir())).run())
        return 0
    except FmplexError as e:
        print(f"{TASK_EXIT_PREFIX}{e.code.value}: {e.message}", file=sys.stderr, flush=True)
        return 2
    except (OSError, ValueError) as e:       # e.g. a run directory too long for ipc:// paths
        print(f"{TASK_EXIT_PREFIX}{ErrorCode.INVALID_INPUT.value}: {e}", file=sys.stderr, flush=True)
        return 2

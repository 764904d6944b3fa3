"""Task-plane message handling: decode, authenticate, check the epoch, dispatch.

Every message after Register carries the session epoch; an unknown epoch is STALE_EPOCH (the task
must register again). The sender's uid (from ZAP) must be the task's owner (or trusted root).
Nothing a task sends can raise out of `handle`: errors become an Error reply to the sender.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fmplexd import control, lifecycle
from ipc import codec, transport
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.messages import (PROTOCOL_VERSION, Commit, Error, Heartbeat, Hello, Ok, PrepareUpdate,
                          Register, Registered, Submit, Unregister, Welcome)

if TYPE_CHECKING:
    from fmplexd.daemon import Daemon

log = logging.getLogger("fmplexd.tasks")
ACCEPTED = frozenset({Hello, Register, Submit, Commit, PrepareUpdate, Unregister, Heartbeat, Ok, Error})


def handle(d: "Daemon", env: transport.Envelope, now: float) -> None:
    try:
        msg = env.decode(ACCEPTED)
    except ProtocolError as e:
        _reply(d, env.identity, Error(codec.peek_ref(env.frames), e.code, e.message))
        return
    try:
        _dispatch(d, env, msg, now)
    except FmplexError as e:
        _reply(d, env.identity, Error(getattr(msg, "ref", 0), e.code, e.message,
                                      epoch=getattr(msg, "epoch", 0)))
    except Exception as e:          # a daemon bug: answer it, log it, keep serving
        log.exception("task-plane handler failed on %s", msg.TYPE)
        _reply(d, env.identity, Error(getattr(msg, "ref", 0), ErrorCode.INTERNAL, repr(e)[:500],
                                      epoch=getattr(msg, "epoch", 0)))


def _dispatch(d: "Daemon", env: transport.Envelope, msg, now: float) -> None:
    if isinstance(msg, Hello):
        _reply(d, env.identity, welcome(d, msg))
        return
    if d.stopping and isinstance(msg, (Register, Submit)):
        raise FmplexError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
    if isinstance(msg, Register):
        entry = lifecycle.register(d, msg, env.peer_uid(), env.identity)
        info = d.engines[entry.config.backbone].backbone.info
        _reply(d, env.identity, Registered(ref=msg.ref, epoch=entry.session, slot=entry.slot.grant(),
                                           backbone=info, heartbeat_ms=d.config.heartbeat_ms))
        return
    if isinstance(msg, (Ok, Error)):        # a task answering a relayed Command
        control.finish_relay(d, msg, env.identity)
        return
    entry = d.registry.by_session.get(msg.epoch)
    if entry is None:
        raise ProtocolError(ErrorCode.STALE_EPOCH, f"epoch {msg.epoch} is no current session")
    if not lifecycle.may_act_for(d, env.peer_uid(), entry.config.owner_uid):
        raise FmplexError(ErrorCode.UNAUTHORIZED, f"this peer may not act for task {entry.name}")
    entry.identity = env.identity
    d.liveness.seen(entry.session, now)
    if isinstance(msg, Submit):
        try:
            d.engines[entry.config.backbone].admit(entry, env.identity, msg, now)
        except FmplexError as e:
            if e.code is not ErrorCode.OVERLOADED:
                entry.errors += 1
            raise
        d.wake.set()
    elif isinstance(msg, Commit):
        lifecycle.commit(d, entry, msg)
    elif isinstance(msg, PrepareUpdate):
        _reply(d, env.identity, lifecycle.prepare_update(d, entry, msg))
    elif isinstance(msg, Unregister):
        lifecycle.remove(d, entry, "task unregistered")
        _reply(d, env.identity, Ok(ref=msg.ref))
    # Heartbeat: being seen is all it does.


def welcome(d: "Daemon", msg: Hello) -> Welcome:
    if msg.proto != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"protocol {msg.proto} is not supported "
                            f"(this daemon speaks {PROTOCOL_VERSION})")
    return Welcome(ref=msg.ref, proto=PROTOCOL_VERSION, epoch=d.epoch,
                   heartbeat_ms=d.config.heartbeat_ms,
                   backbones=[b.info for b in d.backbones.values()])


def _reply(d: "Daemon", identity: bytes | None, msg) -> None:
    if identity is None:
        return
    try:
        transport.send(d.tasks_sock, msg, identity)
    except (transport.PeerGone, transport.PeerBusy):
        pass     # the sender is gone; its session (if any) ends through liveness or the handle plane

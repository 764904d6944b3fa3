"""Task-plane message handling: decode, authenticate, check the epoch, dispatch.

Every message after Register carries the session epoch; an unknown epoch is STALE_EPOCH (the task
must register again). The sender's uid (from ZAP) must be allowed to act for the task's owner
(fmplexd.auth). Nothing a task sends can raise out of `handle`: errors become an Error reply to the
sender. The handler sees only the sessions service, the relays and a few callables.
"""
from __future__ import annotations

import logging
from typing import Callable

from fmplexd.relays import Relays
from fmplexd.sessions import Sessions
from ipc import codec, transport
from ipc.errors import ErrorCode, FmplexError, ProtocolError
from ipc.messages import (CacheStats, Cancel, Commit, Error, Generate, Heartbeat, Hello, Message, Ok,
                          PrepareUpdate, Register, Submit, SubmitImages, SubmitSeries, Unregister,
                          Welcome)

log = logging.getLogger("fmplexd.tasks")
SESSION_REQUESTS = frozenset({Submit, SubmitImages, SubmitSeries, Generate})   # every family's


class TaskPlane:
    ACCEPTED = frozenset({Hello, Register, Commit, PrepareUpdate, Unregister, Heartbeat, Cancel,
                          CacheStats, Ok, Error}) | SESSION_REQUESTS

    def __init__(self, sessions: Sessions, relays: Relays, welcome: Callable[[Hello], Welcome],
                 reply: Callable[[bytes, Message], None], stopping: Callable[[], bool],
                 wake: Callable[[], None]):
        self.sessions, self.relays = sessions, relays
        self.welcome, self.reply, self.stopping, self.wake = welcome, reply, stopping, wake

    def handle(self, env: transport.Envelope, now: float) -> None:
        try:
            msg = env.decode(self.ACCEPTED)
        except ProtocolError as e:
            self.reply(env.identity, Error(codec.peek_ref(env.frames), e.code, e.message))
            return
        try:
            self._dispatch(env, msg, now)
        except FmplexError as e:
            self.reply(env.identity, Error(getattr(msg, "ref", 0), e.code, e.message,
                                           epoch=getattr(msg, "epoch", 0)))
        except Exception as e:          # a daemon bug: answer it, log it, keep serving
            log.exception("task-plane handler failed on %s", msg.TYPE)
            self.reply(env.identity, Error(getattr(msg, "ref", 0), ErrorCode.INTERNAL,
                                           repr(e)[:500], epoch=getattr(msg, "epoch", 0)))

    def _dispatch(self, env: transport.Envelope, msg, now: float) -> None:
        if isinstance(msg, Hello):
            self.reply(env.identity, self.welcome(msg))
            return
        if self.stopping() and isinstance(msg, (Register, *SESSION_REQUESTS)):
            raise FmplexError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        if isinstance(msg, Register):
            self.reply(env.identity, self.sessions.register(msg, env.peer_uid(), env.identity))
            return
        if isinstance(msg, (Ok, Error)):        # a task answering a relayed Command
            self.relays.finish(msg, env.identity)
            return
        entry = self.sessions.acting(msg.epoch, env.peer_uid(), env.identity, now)
        if type(msg) in SESSION_REQUESTS:
            if self.sessions.submit(entry, msg, now):
                self.wake()
        elif isinstance(msg, Cancel):
            self.sessions.cancel(entry, msg.ref, now)
        elif isinstance(msg, Commit):
            self.sessions.commit(entry, msg)
        elif isinstance(msg, PrepareUpdate):
            self.reply(env.identity, self.sessions.prepare_update(entry, msg))
        elif isinstance(msg, Unregister):
            self.sessions.unregister(entry)
            self.reply(env.identity, Ok(ref=msg.ref))
        elif isinstance(msg, CacheStats):
            self.sessions.cache_report(entry, msg)
        # Heartbeat: being seen is all it does.

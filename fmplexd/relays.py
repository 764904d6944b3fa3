"""Operator commands relayed to task processes, and their answers relayed back.

The control API starts a relay (TaskCommand -> Command to the task's process under a daemon ref);
the task plane finishes it when that process answers (Ok or Error with the daemon ref); answers
from any other process are ignored; a relay unanswered for RELAY_TIMEOUT_S is answered TIMEOUT.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ipc.errors import ErrorCode
from ipc.messages import Error, Message, Ok

RELAY_TIMEOUT_S = 60.0


@dataclass(slots=True, frozen=True)
class _Relay:
    operator: bytes          # the operator's control-socket identity
    operator_ref: int
    started: float
    task_identity: bytes     # the task process the command went to


class Relays:
    def __init__(self, reply_operator: Callable[[bytes, Message], None]):
        self._reply = reply_operator
        self._open: dict[int, _Relay] = {}
        self._next_ref = 1 << 40

    def start(self, operator: bytes, operator_ref: int, task_identity: bytes) -> int:
        """Record a relay; returns the daemon ref to send the Command under."""
        self._next_ref += 1
        self._open[self._next_ref] = _Relay(operator, operator_ref, time.monotonic(), task_identity)
        return self._next_ref

    def finish(self, msg: Ok | Error, sender: bytes) -> None:
        """A task answered a relayed Command: pass the answer to the operator who asked."""
        relay = self._open.get(msg.ref)
        if relay is None or relay.task_identity != sender:
            return
        del self._open[msg.ref]
        if isinstance(msg, Ok):
            self._reply(relay.operator, Ok(ref=relay.operator_ref, message=msg.message))
        else:
            self._reply(relay.operator, Error(relay.operator_ref, msg.code, msg.message))

    def expire(self, now: float) -> None:
        for ref, relay in list(self._open.items()):
            if now - relay.started > RELAY_TIMEOUT_S:
                del self._open[ref]
                self._reply(relay.operator, Error(relay.operator_ref, ErrorCode.TIMEOUT,
                                                  "the task did not answer"))

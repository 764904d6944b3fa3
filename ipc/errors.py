"""Error codes that cross the wire, and the exceptions that carry them.

Every failure a peer can be told about has one `ErrorCode`; its string value is what travels in an
`Error` message (docs/protocol.md lists them). `FmplexError` carries a code and a human message;
`ProtocolError` is the subclass raised for anything malformed on the wire, and it is the only
exception the decoder ever lets escape.
"""
from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    # Wire and session errors (the message itself is wrong).
    BAD_FRAME = "bad_frame"                  # not decodable: bad MessagePack, wrong frame count
    BAD_MESSAGE = "bad_message"              # decodable but invalid: missing/extra/mistyped field
    UNKNOWN_TYPE = "unknown_type"            # "type" names no message of this protocol
    TOO_LARGE = "too_large"                  # a size limit was exceeded
    VERSION_MISMATCH = "version_mismatch"    # Hello with an unsupported protocol version
    STALE_EPOCH = "stale_epoch"              # message of an old peer incarnation or session
    NOT_REGISTERED = "not_registered"        # a session message before Register
    UNEXPECTED = "unexpected"                # a valid message this socket does not accept
    # Request errors (the message is fine, the request cannot be served).
    UNKNOWN_TASK = "unknown_task"
    OVERLOADED = "overloaded"                # the task's queue is full; retry later
    TIMEOUT = "timeout"                      # the deadline passed before execution
    INVALID_EXTENSION = "invalid_extension"  # extension spec or tensors do not fit the backbone
    INVALID_INPUT = "invalid_input"          # request content is wrong (empty, bad ids, ...)
    OVERSIZED = "oversized"                  # request larger than the daemon's per-request limit
    UNAUTHORIZED = "unauthorized"            # peer uid / key may not act for this task
    CONFLICT = "conflict"                    # the task name is held by another live process
    TASK_UNAVAILABLE = "task_unavailable"    # the task's process is dead or restarting (peer dead)
    DAEMON_UNAVAILABLE = "daemon_unavailable"  # the daemon is gone or restarting (peer dead)
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"                    # a bug on the answering side; the request failed


# A task process that cannot start prints "<TASK_EXIT_PREFIX><code>: <message>" as its last line on
# stderr; the daemon's supervisor turns that line back into a typed error for the deploy's caller.
TASK_EXIT_PREFIX = "fmplex-task-error: "


class FmplexError(Exception):
    """A failure with a wire code. `str(e)` is `"code: message"`."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class ProtocolError(FmplexError):
    """A malformed frame or message. Raised by the codec; the only exception decode() lets out."""


# Client-side exception classes per code, so callers can `except OverloadedError`. "Peer dead"
# (TaskUnavailable, DaemonUnavailable) and "request failed" (everything else) stay distinct.
class OverloadedError(FmplexError): pass
class RequestTimeout(FmplexError): pass
class TaskUnavailable(FmplexError): pass
class DaemonUnavailable(FmplexError): pass
class UnknownTask(FmplexError): pass
class InvalidRequest(FmplexError): pass
class Unauthorized(FmplexError): pass


_CLASSES = {
    ErrorCode.OVERLOADED: OverloadedError, ErrorCode.TIMEOUT: RequestTimeout,
    ErrorCode.TASK_UNAVAILABLE: TaskUnavailable, ErrorCode.DAEMON_UNAVAILABLE: DaemonUnavailable,
    ErrorCode.SHUTTING_DOWN: DaemonUnavailable, ErrorCode.UNKNOWN_TASK: UnknownTask,
    ErrorCode.INVALID_INPUT: InvalidRequest, ErrorCode.OVERSIZED: InvalidRequest,
    ErrorCode.INVALID_EXTENSION: InvalidRequest, ErrorCode.UNAUTHORIZED: Unauthorized,
}


def error_for(code: ErrorCode, message: str) -> FmplexError:
    """The exception a client raises for an Error reply with this code."""
    if code in _PROTOCOL_CODES:
        return ProtocolError(code, message)
    return _CLASSES.get(code, FmplexError)(code, message)


_PROTOCOL_CODES = {ErrorCode.BAD_FRAME, ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_TYPE,
                   ErrorCode.TOO_LARGE, ErrorCode.VERSION_MISMATCH, ErrorCode.STALE_EPOCH,
                   ErrorCode.NOT_REGISTERED, ErrorCode.UNEXPECTED}

"""The one codec: Message <-> list of frames (MessagePack header + out-of-band tensor frames).

Framing: frame 0 is a MessagePack map {"type": <TYPE>, <field>: <value>...}; frames 1..n are the raw
little-endian bytes of the message's Tensor fields, in the order their {"frame": i} references give.
Fields whose value is None are omitted; a field with a default may be omitted by the sender.

`decode` validates everything (frame count, header size, MessagePack well-formedness, message type,
every field's type, bounds and enum value, tensor dtype/shape/byte length, no unreferenced frames)
before returning, and raises `ProtocolError` -- never anything else -- for any malformed input.
No pickle anywhere: MessagePack ext types are refused.
"""
from __future__ import annotations

import msgpack
import numpy as np

from ipc.errors import ErrorCode, ProtocolError
from ipc.fields import DecodeContext, EncodeContext, build, schema_fields
from ipc.messages import ALL_MESSAGES, Message

MAX_HEADER_BYTES = 4 << 20     # frame 0
MAX_FRAMES = 65                # header + 64 tensors
MAX_CONTAINER_LEN = 1 << 20    # any MessagePack array/map inside a header


def _compile(cls):
    specs = schema_fields(cls)
    return cls, specs, frozenset(name for name, _, _ in specs) | {"type"}


_SCHEMAS = {cls.TYPE: _compile(cls) for cls in ALL_MESSAGES}
_ENCODERS = {cls: _SCHEMAS[cls.TYPE][1] for cls in ALL_MESSAGES}


def _refuse_ext(code, data):
    raise ValueError(f"MessagePack ext type {code} is not allowed")


def _numpy_scalar(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(msg: Message) -> list:
    """Frames for `msg`: [header bytes, *tensor buffers]. Buffers are not copied."""
    ctx = EncodeContext()
    header = {"type": msg.TYPE}
    for name, spec, _ in _ENCODERS[type(msg)]:
        value = getattr(msg, name)
        if value is not None:
            header[name] = spec.encode(value, ctx)
    return [msgpack.packb(header, use_bin_type=True, default=_numpy_scalar), *ctx.buffers]


def _buffer(frame):
    """A bytes-like view of a frame: bytes, memoryview, or a zmq.Frame (its zero-copy buffer)."""
    if isinstance(frame, (bytes, bytearray)):
        return frame
    buf = frame if isinstance(frame, memoryview) else getattr(frame, "buffer", None)
    if buf is None:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame of type {type(frame).__name__}")
    if not buf.c_contiguous:
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame buffer is not contiguous")
    return buf if buf.itemsize == 1 and buf.ndim == 1 else buf.cast("B")


def decode(frames: list, allowed: frozenset[type] | None = None) -> Message:
    """Validate and decode one message. `allowed` restricts the accepted message classes."""
    if not isinstance(frames, (list, tuple)) or not 1 <= len(frames) <= MAX_FRAMES:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"expected 1..{MAX_FRAMES} frames")
    buffers = [_buffer(f) for f in frames]
    head = buffers[0]
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header of {len(head)} bytes > {MAX_HEADER_BYTES}")
    try:
        obj = msgpack.unpackb(
            head, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext,
            max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES,
            max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN, max_ext_len=0)
    except Exception as e:  # any malformed MessagePack, whatever msgpack raises for it
        raise ProtocolError(ErrorCode.BAD_FRAME, f"header is not valid MessagePack ({e})") from None
    if type(obj) is not dict or type(obj.get("type")) is not str:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "header must be a map with a string 'type'")
    schema = _SCHEMAS.get(obj["type"])
    if schema is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {obj['type'][:64]!r}")
    cls, specs, names = schema
    if allowed is not None and cls not in allowed:
        raise ProtocolError(ErrorCode.UNEXPECTED, f"{cls.TYPE!r} is not accepted on this socket")
    ctx = DecodeContext(buffers[1:])
    try:
        msg = build(cls, specs, names, obj, ctx)
    except ProtocolError:
        raise
    except Exception as e:  # defence in depth: a checker bug must not escape as another type
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{cls.TYPE}: {type(e).__name__}: {e}") from None
    if len(ctx.claimed) != len(buffers) - 1:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"{len(buffers) - 1 - len(ctx.claimed)} unreferenced frame(s)")
    return msg


def peek_ref(frames: list) -> int:
    """The `ref` of a message that failed to decode, so its Error can be correlated; 0 if none."""
    try:
        # The limits decode() itself used: a header that is a map with a valid ref gets its ref
        # back (docs/protocol.md §5.5), also when it failed on a list longer than its schema allows.
        obj = msgpack.unpackb(_buffer(frames[0]), raw=False, ext_hook=_refuse_ext,
                              max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES,
                              max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN,
                              max_ext_len=0)
        ref = obj.get("ref") if type(obj) is dict else None
        return ref if type(ref) is int and 0 <= ref < 1 << 64 else 0
    except Exception:
        return 0

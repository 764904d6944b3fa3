"""Field specifications: the type, bounds and wire form of each field of a message.

A message schema is a frozen dataclass whose fields are annotated `Annotated[T, spec]`, where spec is
one of the classes below. The codec compiles each schema once into a checker (wire value -> Python
value, raising `ProtocolError` on anything out of spec) and an encoder (Python value -> wire value).

Wire forms (MessagePack): Int -> int, Float -> float (ints accepted), Bool -> bool, Str -> str (UTF-8),
Bytes -> bin, Enum -> its string value, ListOf -> array, MapOf -> map with str keys, Struct -> map of
its fields, Tensor -> map {"dtype": str, "shape": [int], "frame": int} naming an out-of-band frame.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, get_type_hints

import numpy as np

from ipc.errors import ErrorCode, ProtocolError

# Wire dtype names -> little-endian numpy dtypes. bfloat16 has no numpy dtype; it is not a wire dtype.
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
}
DTYPE_NAMES = {dt: name for name, dt in WIRE_DTYPES.items()}
MAX_TENSOR_NDIM = 4
MAX_TENSOR_DIM = 1 << 31


class FieldError(ProtocolError):
    """A field out of spec. Containers prepend their part of the path while the error unwinds."""

    def __init__(self, why: str, code: ErrorCode = ErrorCode.BAD_MESSAGE):
        super().__init__(code, why)
        self.why = why
        self.path: list[str] = []

    def at(self, part: str) -> "FieldError":
        self.path.append(part)
        path = "".join(reversed(self.path)).lstrip(".")
        self.message = f"field {path}: {self.why}" if path else self.why
        self.args = (f"{self.code.value}: {self.message}",)
        return self


def _bad(why: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> FieldError:
    return FieldError(why, code)


class DecodeContext:
    """Out-of-band frames of the message being decoded; each may be claimed by one Tensor field."""

    __slots__ = ("frames", "claimed")

    def __init__(self, frames: list):
        self.frames = frames
        self.claimed: set[int] = set()


class EncodeContext:
    """Buffers collected while encoding; Tensor fields append theirs and record the index."""

    __slots__ = ("buffers",)

    def __init__(self):
        self.buffers: list = []


class Spec:
    """Base of all field specs: check(wire value) -> value, encode(value) -> wire value."""

    def check(self, value: Any, ctx: DecodeContext) -> Any:
        raise NotImplementedError

    def encode(self, value: Any, ctx: EncodeContext) -> Any:
        return value


class Int(Spec):
    def __init__(self, lo: int = 0, hi: int = (1 << 63) - 1):
        self.lo, self.hi = lo, hi

    def check(self, value, ctx):
        if type(value) is not int:
            raise _bad(f"expected int, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise _bad(f"{value} outside [{self.lo}, {self.hi}]")
        return value


class Float(Spec):
    """A finite float in [lo, hi] (NaN and infinities are refused)."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf):
        self.lo, self.hi = lo, hi

    def check(self, value, ctx):
        if type(value) not in (float, int):
            raise _bad(f"expected float, got {type(value).__name__}")
        value = float(value)
        if not (math.isfinite(value) and self.lo <= value <= self.hi):
            raise _bad(f"{value} outside [{self.lo}, {self.hi}] or not finite")
        return value


class Bool(Spec):
    def check(self, value, ctx):
        if type(value) is not bool:
            raise _bad(f"expected bool, got {type(value).__name__}")
        return value


class Str(Spec):
    def __init__(self, max_len: int = 256, min_len: int = 0, pattern: str | None = None):
        self.max_len, self.min_len = max_len, min_len
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, value, ctx):
        if type(value) is not str:
            raise _bad(f"expected str, got {type(value).__name__}")
        if not self.min_len <= len(value) <= self.max_len:
            raise _bad(f"length {len(value)} outside [{self.min_len}, {self.max_len}]")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _bad(f"{value!r} does not match {self.pattern.pattern}")
        return value


class Bytes(Spec):
    def __init__(self, max_len: int = 4096):
        self.max_len = max_len

    def check(self, value, ctx):
        if type(value) is not bytes:
            raise _bad(f"expected bin, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise _bad(f"length {len(value)} > {self.max_len}")
        return value


class Enum(Spec):
    def __init__(self, cls: type[enum.Enum]):
        self.cls = cls
        self.by_value = {m.value: m for m in cls}

    def check(self, value, ctx):
        member = self.by_value.get(value) if type(value) is str else None
        if member is None:
            raise _bad(f"{value!r} is not one of {sorted(self.by_value)}")
        return member

    def encode(self, value, ctx):
        return value.value


class Optional(Spec):
    """None (nil on the wire) or a value of the inner spec."""

    def __init__(self, inner: Spec):
        self.inner = inner

    def check(self, value, ctx):
        return None if value is None else self.inner.check(value, ctx)

    def encode(self, value, ctx):
        return None if value is None else self.inner.encode(value, ctx)


class ListOf(Spec):
    def __init__(self, item: Spec, max_len: int, min_len: int = 0):
        self.item, self.max_len, self.min_len = item, max_len, min_len

    def check(self, value, ctx):
        if type(value) is not list:
            raise _bad(f"expected array, got {type(value).__name__}")
        if not self.min_len <= len(value) <= self.max_len:
            raise _bad(f"length {len(value)} outside [{self.min_len}, {self.max_len}]")
        check, out = self.item.check, []
        for i, v in enumerate(value):
            try:
                out.append(check(v, ctx))
            except FieldError as e:  # zero-cost until raised
                raise e.at(f"[{i}]") from None
        return out

    def encode(self, value, ctx):
        enc = self.item.encode
        return [enc(v, ctx) for v in value]


class MapOf(Spec):
    """A map from bounded strings to values of one spec."""

    def __init__(self, value: Spec, max_len: int, key: Str | None = None):
        self.value, self.max_len, self.key = value, max_len, key or Str(128, 1)

    def check(self, value, ctx):
        if type(value) is not dict:
            raise _bad(f"expected map, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise _bad(f"{len(value)} entries > {self.max_len}")
        out = {}
        for k, v in value.items():
            try:
                out[self.key.check(k, ctx)] = self.value.check(v, ctx)
            except FieldError as e:
                raise e.at(f"[{str(k)[:32]!r}]") from None
        return out

    def encode(self, value, ctx):
        return {k: self.value.encode(v, ctx) for k, v in value.items()}


class Tensor(Spec):
    """An out-of-band array: the header holds {dtype, shape, frame}; the bytes are frame `frame`.

    Decoding yields a read-only numpy array over the received frame (no copy). Encoding accepts a
    numpy array of a wire dtype; a non-contiguous array is made contiguous (one copy).
    """

    def __init__(self, dtypes: tuple[str, ...] = tuple(WIRE_DTYPES), max_ndim: int = MAX_TENSOR_NDIM,
                 ndim: int | None = None):
        """ndim, when given, is the exact rank required (max_ndim then follows it)."""
        self.dtypes, self.ndim = dtypes, ndim
        self.max_ndim = ndim if ndim is not None else max_ndim

    def check(self, value, ctx):
        if type(value) is not dict or set(value) != {"dtype", "shape", "frame"}:
            raise _bad("expected tensor map {dtype, shape, frame}")
        dtype_name, shape, frame = value["dtype"], value["shape"], value["frame"]
        if dtype_name not in self.dtypes:
            raise _bad(f"dtype {dtype_name!r} not in {list(self.dtypes)}")
        if type(shape) is not list or len(shape) > self.max_ndim or not all(
                type(d) is int and 0 <= d < MAX_TENSOR_DIM for d in shape):
            raise _bad(f"bad shape {shape!r}")
        if self.ndim is not None and len(shape) != self.ndim:
            raise _bad(f"shape {shape!r} must have {self.ndim} dimension(s)")
        if type(frame) is not int or not 1 <= frame < len(ctx.frames) + 1 or frame in ctx.claimed:
            raise _bad(f"frame {frame!r} missing or already used", ErrorCode.BAD_FRAME)
        ctx.claimed.add(frame)
        dtype = WIRE_DTYPES[dtype_name]
        buf = ctx.frames[frame - 1]
        nbytes = dtype.itemsize * math.prod(shape)
        if len(buf) != nbytes:
            raise _bad(f"frame {frame} holds {len(buf)} bytes, shape {shape} needs {nbytes}",
                       ErrorCode.BAD_FRAME)
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        arr.flags.writeable = False   # zmq frames and bytearrays are writable buffers
        return arr

    def encode(self, value, ctx):
        arr = np.asarray(value)
        if not arr.flags.c_contiguous:   # (np.ascontiguousarray alone would make 0-d arrays 1-d)
            arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":   # the wire is little-endian: swap the bytes, not just the name
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        name = DTYPE_NAMES.get(arr.dtype)
        if name is None or name not in self.dtypes:
            raise TypeError(f"dtype {arr.dtype} is not a wire dtype of this field")
        ctx.buffers.append(arr.reshape(-1).view(np.uint8).data)
        return {"dtype": name, "shape": list(arr.shape), "frame": len(ctx.buffers)}


class Struct(Spec):
    """A nested schema (a dataclass with Annotated fields), carried as a map of its fields."""

    def __init__(self, cls: type):
        self.cls = cls
        self.fields = schema_fields(cls)
        self.names = frozenset(name for name, _, _ in self.fields)

    def check(self, value, ctx):
        if type(value) is not dict:
            raise _bad(f"expected map, got {type(value).__name__}")
        return build(self.cls, self.fields, self.names, value, ctx)

    def encode(self, value, ctx):
        return {name: spec.encode(getattr(value, name), ctx) for name, spec, _ in self.fields}


def schema_fields(cls: type) -> list[tuple[str, Spec, bool]]:
    """(name, spec, required) for each field of a schema dataclass, in declaration order."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    hints = get_type_hints(cls, include_extras=True)
    out = []
    for f in fields(cls):
        meta = getattr(hints[f.name], "__metadata__", ())
        if not meta or not isinstance(meta[0], Spec):
            raise TypeError(f"{cls.__name__}.{f.name} lacks an Annotated spec")
        required = f.default is MISSING and f.default_factory is MISSING
        out.append((f.name, meta[0], required))
    return out


def build(cls, specs, names, value: dict, ctx: DecodeContext):
    """Check a wire map against a schema's fields and construct the dataclass."""
    extra = value.keys() - names
    if extra:
        raise _bad(f"unknown field(s) {sorted(str(k)[:32] for k in extra)[:8]} in {cls.__name__}")
    kwargs = {}
    for name, spec, required in specs:
        if name in value:
            try:
                kwargs[name] = spec.check(value[name], ctx)
            except FieldError as e:
                raise e.at("." + name) from None
        elif required:
            raise _bad("missing").at("." + name)
    return cls(**kwargs)

"""Fuzzing codec.decode: whatever arrives, only ProtocolError may escape.

Three generators: (a) random frames, (b) valid encodings of random messages, then mutated,
(c) random MessagePack structures under a valid "type" (keys biased towards real field names).
Valid messages come from strategies derived from the schemas themselves (ipc.fields specs), so a new
message or field is fuzzed without touching this file. Each fuzz test has a quick variant (part of the
everyday suite) and a `slow` one with many more examples.
"""
from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc import codec
from ipc.errors import ErrorCode, ProtocolError
from ipc.fields import (WIRE_DTYPES, Bool, Bytes, Enum, Float, Int, ListOf, MapOf, Optional, Spec,
                        Str, Struct, Tensor, schema_fields)
from ipc.messages import ALL_MESSAGES, Message
from testkit.fuzz.mutations import edit_frames, edit_header

QUICK = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))
MAX_LIST = 3          # keep generated containers small: the checks are per element anyway


# ---------------------------------------------------------------- strategies from the schemas

def value_strategy(spec: Spec) -> st.SearchStrategy:
    """Valid Python values for a field spec."""
    if isinstance(spec, Int):
        return st.one_of(st.integers(spec.lo, spec.hi), st.sampled_from([spec.lo, spec.hi]))
    if isinstance(spec, Float):
        return st.floats(spec.lo, spec.hi, allow_nan=False, allow_infinity=False)   # Float: finite
    if isinstance(spec, Bool):
        return st.booleans()
    if isinstance(spec, Str):
        if spec.pattern is not None:
            return st.from_regex(spec.pattern, fullmatch=True).filter(
                lambda s: spec.min_len <= len(s) <= spec.max_len)
        return st.text(min_size=spec.min_len, max_size=min(spec.max_len, 24))
    if isinstance(spec, Bytes):
        return st.binary(max_size=min(spec.max_len, 24))
    if isinstance(spec, Enum):
        return st.sampled_from(list(spec.cls))
    if isinstance(spec, Optional):
        return st.one_of(st.none(), value_strategy(spec.inner))
    if isinstance(spec, ListOf):
        return st.lists(value_strategy(spec.item), min_size=spec.min_len,
                        max_size=max(spec.min_len, min(spec.max_len, MAX_LIST)))
    if isinstance(spec, MapOf):
        return st.dictionaries(value_strategy(spec.key), value_strategy(spec.value),
                               max_size=min(spec.max_len, MAX_LIST))
    if isinstance(spec, Struct):
        return struct_strategy(spec.cls)
    if isinstance(spec, Tensor):
        return tensor_strategy(spec)
    raise TypeError(f"no strategy for {type(spec).__name__}: add one here")


@st.composite
def tensor_strategy(draw, spec: Tensor):
    dtype = WIRE_DTYPES[draw(st.sampled_from(spec.dtypes))]
    rank = spec.ndim if spec.ndim is not None else draw(st.integers(0, spec.max_ndim))
    shape = draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank))
    raw = draw(st.binary(min_size=dtype.itemsize * math.prod(shape),
                         max_size=dtype.itemsize * math.prod(shape)))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def struct_strategy(cls) -> st.SearchStrategy:
    fields = schema_fields(cls)
    required = {name: value_strategy(spec) for name, spec, req in fields if req}
    optional = {name: value_strategy(spec) for name, spec, req in fields if not req}
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: cls(**kw))


MESSAGES = st.one_of([struct_strategy(cls) for cls in ALL_MESSAGES])


def same(a, b) -> bool:
    """Equality for messages holding numpy arrays (by dtype and bytes: NaN payloads included)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(
            same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, list):
        return type(b) is list and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------- the property

def decode_only_protocol_errors(frames):
    """Decode; anything but a Message or a ProtocolError fails the test."""
    try:
        msg = codec.decode(frames)
    except ProtocolError as e:
        assert isinstance(e.code, ErrorCode)
        assert isinstance(e.message, str)
        return None
    assert isinstance(msg, Message)
    return msg


# ---------------------------------------------------------------- (0) schema round trip

def check_roundtrip(msg):
    frames = [bytes(f) for f in codec.encode(msg)]
    got = codec.decode(frames)
    assert same(got, msg), (got, msg)


@QUICK
@given(MESSAGES)
def test_random_valid_messages_roundtrip(msg):
    check_roundtrip(msg)


@pytest.mark.slow
@SLOW
@given(MESSAGES)
def test_random_valid_messages_roundtrip_slow(msg):
    check_roundtrip(msg)


# ---------------------------------------------------------------- (a) random frames

FRAME = st.one_of(
    st.binary(max_size=64),
    # Start with a fixmap/map16 marker so some frames get past the first byte of the parser.
    st.builds(lambda head, body: head + body, st.sampled_from([b"\x81", b"\x82", b"\x83", b"\xde\x00\x03",
                                                               b"\x81\xa4type"]),
              st.binary(max_size=64)),
)
RANDOM_FRAMES = st.lists(FRAME, min_size=0, max_size=70)


def check_random_frames(frames, kind):
    frames = [kind(f) for f in frames]
    decode_only_protocol_errors(frames)


@QUICK
@given(RANDOM_FRAMES, st.sampled_from([bytes, bytearray, memoryview]))
def test_random_frames(frames, kind):
    check_random_frames(frames, kind)


@pytest.mark.slow
@SLOW
@given(RANDOM_FRAMES, st.sampled_from([bytes, bytearray, memoryview]))
def test_random_frames_slow(frames, kind):
    check_random_frames(frames, kind)


# ---------------------------------------------------------------- (b) mutated valid encodings

HEADER_EDIT = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(None)),
)
FRAME_EDIT = st.one_of(
    st.tuples(st.just("drop"), st.integers(1, 8), st.just(None)),
    st.tuples(st.just("duplicate"), st.integers(1, 8), st.just(None)),
    st.tuples(st.just("append"), st.just(0), st.binary(max_size=32)),
    st.tuples(st.just("resize"), st.integers(1, 8), st.integers(-5, 5)),
    st.tuples(st.just("swap"), st.integers(1, 8), st.integers(1, 8)),
)


def check_mutated(msg, header_edits, frame_edits):
    frames = [bytes(f) for f in codec.encode(msg)]
    head = bytearray(frames[0])
    for edit in header_edits:
        head = edit_header(head, *edit)
    frames[0] = bytes(head)
    for edit in frame_edits:
        frames = edit_frames(frames, *edit)
    decode_only_protocol_errors(frames)


MUTATIONS = (MESSAGES, st.lists(HEADER_EDIT, max_size=6), st.lists(FRAME_EDIT, max_size=3))


@QUICK
@given(*MUTATIONS)
def test_mutated_valid_encodings(msg, header_edits, frame_edits):
    check_mutated(msg, header_edits, frame_edits)


@pytest.mark.slow
@SLOW
@given(*MUTATIONS)
def test_mutated_valid_encodings_slow(msg, header_edits, frame_edits):
    check_mutated(msg, header_edits, frame_edits)


# ---------------------------------------------------------------- (c) random structures, valid type

def _names_of(spec, out: set):
    """Field names reachable through a spec (nested structs, tensor maps)."""
    while isinstance(spec, (Optional, ListOf)):
        spec = spec.inner if isinstance(spec, Optional) else spec.item
    if isinstance(spec, Struct):
        for name, inner, _ in spec.fields:
            out.add(name)
            _names_of(inner, out)
    elif isinstance(spec, Tensor):
        out.update(("dtype", "shape", "frame"))
    return out


KEYS = sorted({n for cls in ALL_MESSAGES for n in _names_of(Struct(cls), set())})
ENUM_VALUES = sorted({m.value for cls in ALL_MESSAGES for _, spec, _ in schema_fields(cls)
                      if isinstance(spec, Enum) for m in spec.cls} | set(WIRE_DTYPES))

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),                      # the whole MessagePack int range
    st.sampled_from([0, 1, -1, (1 << 31), (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -(1 << 63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16), st.sampled_from(ENUM_VALUES),
    st.binary(max_size=16),
)
KEY = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.binary(max_size=4))
STRUCTURES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(KEY, children, max_size=6)),
    max_leaves=12,
)


@st.composite
def typed_headers(draw):
    cls = draw(st.sampled_from(ALL_MESSAGES))
    names = [name for name, _, _ in schema_fields(cls)]
    body = draw(st.dictionaries(st.one_of(st.sampled_from(names), KEY), STRUCTURES, max_size=6))
    body["type"] = cls.TYPE
    n_frames = draw(st.integers(0, 4))
    frames = draw(st.lists(st.binary(max_size=48), min_size=n_frames, max_size=n_frames))
    return body, frames


@st.composite
def deep_nesting(draw):
    """A header whose field value nests arrays/maps up to thousands deep (hand-packed: msgpack's
    own packer stops at 512 levels, a hostile peer does not)."""
    cls = draw(st.sampled_from(ALL_MESSAGES))
    names = [name for name, _, _ in schema_fields(cls)]
    depth = draw(st.integers(1, 3000))
    pattern = draw(st.lists(st.sampled_from(names + [None]), min_size=1, max_size=4))
    leaf = msgpack.packb(draw(SCALARS), use_bin_type=True)
    levels = [b"\x91" if key is None else b"\x81" + msgpack.packb(key)
              for key in (pattern[i % len(pattern)] for i in range(depth))]
    field = msgpack.packb(draw(st.sampled_from(names)))
    return b"\x82\xa4type" + msgpack.packb(cls.TYPE) + field + b"".join(levels) + leaf


def check_structure(header, frames):
    try:
        raw = msgpack.packb(header, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        return  # not representable (e.g. nesting deeper than msgpack packs); nothing to decode
    decode_only_protocol_errors([raw, *frames])


@QUICK
@given(typed_headers())
def test_random_structures_with_a_valid_type(header_frames):
    check_structure(*header_frames)


@QUICK
@given(deep_nesting())
def test_deeply_nested_structures(header):
    decode_only_protocol_errors([header])


@pytest.mark.slow
@SLOW
@given(typed_headers())
def test_random_structures_with_a_valid_type_slow(header_frames):
    check_structure(*header_frames)

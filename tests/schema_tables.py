"""Render the field tables of docs/protocol.md from the schemas in ipc/messages.py.

    python -m tests.schema_tables --fix docs/protocol.md     # rewrite every table in place

Each message is documented under a heading "#### `TYPE`" and each nested struct under "#### Name",
each followed by its table; tests/test_protocol_doc_sync.py checks that every table equals what
this module renders, so the document cannot drift from the code.
"""
from __future__ import annotations

import enum
import math
import re
import sys
from dataclasses import MISSING, fields

from ipc import fields as F
from ipc import messages as M

HEADER = ["| field | MessagePack type | bounds | default |", "|---|---|---|---|"]


def _num(x) -> str:
    if isinstance(x, float):
        return ("-inf" if x < 0 else "+inf") if math.isinf(x) else repr(x)
    for bits in (64, 63, 32):
        if x == (1 << bits) - 1:
            return f"2^{bits}-1"
    if x >= 1 << 16 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return f"{x:,}".replace(",", "_") if x >= 100_000 else str(x)


def describe(s: F.Spec) -> tuple[str, str]:
    """(MessagePack type, bounds) of a field spec."""
    if isinstance(s, F.Int):
        return "int", f"{_num(s.lo)} .. {_num(s.hi)}"
    if isinstance(s, F.Float):
        if math.isinf(s.lo) and math.isinf(s.hi):
            return "float (int accepted)", "finite"
        return "float (int accepted)", f"{_num(s.lo)} .. {_num(s.hi)}, finite"
    if isinstance(s, F.Bool):
        return "bool", ""
    if isinstance(s, F.Str):
        b = f"{s.min_len} .. {_num(s.max_len)} chars"
        return "str", b + (f", `{s.pattern.pattern}`" if s.pattern is not None else "")
    if isinstance(s, F.Bytes):
        return "bin", f"0 .. {s.max_len} bytes"
    if isinstance(s, F.Enum):
        return "str (enum)", " \\| ".join(f'`"{m.value}"`' for m in s.cls)
    if isinstance(s, F.Optional):
        t, b = describe(s.inner)
        return t + " or nil", b
    if isinstance(s, F.ListOf):
        t, b = describe(s.item)
        return f"array of {t}" + (f" ({b})" if b else ""), f"{s.min_len} .. {_num(s.max_len)} items"
    if isinstance(s, F.MapOf):
        t, _ = describe(s.value)
        return f"map str -> {t}", f"<= {s.max_len} entries"
    if isinstance(s, F.Struct):
        return f"map [{s.cls.__name__}](#{s.cls.__name__.lower()})", ""
    if isinstance(s, F.Tensor):
        rank = f"ndim = {s.ndim}" if s.ndim is not None else f"ndim <= {s.max_ndim}"
        return "tensor ref", "dtype " + " \\| ".join(s.dtypes) + f"; {rank}"
    raise TypeError(f"no description for {type(s).__name__}")


def _default(cls, name: str) -> str:
    f = next(f for f in fields(cls) if f.name == name)
    if f.default_factory is not MISSING:
        return f"`{f.default_factory()!r}`"
    if f.default is MISSING:
        return "**required**"
    v = f.default
    if isinstance(v, enum.Enum):
        return f'`"{v.value}"`'
    if v is None:
        return "nil (omitted)"
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    return f'`"{v}"`' if isinstance(v, str) else f"`{v}`"


def table(cls) -> str:
    rows = [f"| `{n}` | {t} | {b} | {_default(cls, n)} |"
            for n, spec, _ in F.schema_fields(cls) for t, b in [describe(spec)]]
    return "\n".join(HEADER + rows)


def structs() -> list[type]:
    """Every nested struct reachable from a message, in first-use order."""
    out: list[type] = []

    def walk(spec):
        if isinstance(spec, F.Struct) and spec.cls not in out:
            out.append(spec.cls)
            for _, sub, _ in F.schema_fields(spec.cls):
                walk(sub)
        for attr in ("inner", "item", "value"):
            sub = getattr(spec, attr, None)
            if isinstance(sub, F.Spec):
                walk(sub)
    for cls in M.ALL_MESSAGES:
        for _, spec, _ in F.schema_fields(cls):
            walk(spec)
    return out


def expected() -> dict[str, str]:
    """Heading -> table, for every message and struct."""
    out = {f"#### `{c.TYPE}`": table(c) for c in M.ALL_MESSAGES}
    out.update({f"#### {c.__name__}": table(c) for c in structs()})
    return out


_BLOCK = re.compile(r"^(#### [^\n]+)\n\n(\| field \|[^\n]*\n(?:\|[^\n]*\n?)*)", re.M)


def documented(text: str) -> dict[str, str]:
    return {m.group(1).strip(): m.group(2).rstrip("\n") for m in _BLOCK.finditer(text)}


def fix(path: str) -> None:
    want = expected()
    with open(path) as f:
        text = f.read()

    def sub(m):
        head = m.group(1).strip()
        return f"{m.group(1)}\n\n{want[head]}\n" if head in want else m.group(0)
    with open(path, "w") as f:
        f.write(_BLOCK.sub(sub, text))
    missing = sorted(set(want) - set(documented(text)))
    if missing:
        print("not documented yet (add a heading and a table):", *missing, sep="\n  ")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fix"] and len(sys.argv) == 3:
        fix(sys.argv[2])
    else:
        print(__doc__)

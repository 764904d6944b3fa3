"""A cluster task's spec as one host runs it.

The operator's spec (TOML, ipc/spec.py) with `[endpoint] tcp` set to the address the host's agent
assigned, and relative extension paths made absolute against the directory the operator's spec
came from. Extension files are read by the task process on the host where it runs, so they must be
readable at that path on every host (shared storage: NFS, a synced directory, an object-store
mount); on one machine (tests) they simply are.
"""
from __future__ import annotations

import json
import os
import tomllib

from ipc.spec import TaskSpec, parse_spec

PATH_FIELDS = ("adapter", "head")


def host_spec(text: str, spec_dir: str, tcp: str) -> str:
    """The spec text a host deploys: endpoint.tcp = `tcp`, extension paths absolute. Validated."""
    data = tomllib.loads(text)
    ext = data.get("extension", {})
    for key in PATH_FIELDS:
        if isinstance(ext.get(key), str) and spec_dir and not os.path.isabs(ext[key]):
            ext[key] = os.path.join(spec_dir, ext[key])
    data.setdefault("endpoint", {})["tcp"] = tcp
    out = dumps(data)
    parse_spec(out)
    return out


def read_spec(text: str, spec_dir: str = "") -> TaskSpec:
    """The operator's spec, validated (raises SpecError)."""
    return parse_spec(text, base_dir=spec_dir or None)


def dumps(data: dict) -> str:
    """TOML for a spec's value types: str, int, float, bool, lists of them, one level of tables."""
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")   # TOML-valid
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise ValueError(f"a spec holds no {type(v).__name__} values")

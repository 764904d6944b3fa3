"""API keys of the gateway (TOML), each mapped to the owner whose tasks it reaches:

    [keys]
    "sk-fmplex-alice-3f9c2e71b0a4d6e8" = "alice"      # a user name or a uid
    "sk-fmplex-batch-77aa01d2c3e4f5a6" = 1001

Keys are at least MIN_KEY_CHARS characters. The file must not be readable by group or others
(like ssh's keys); the gateway refuses to start otherwise. Keys are held as SHA-256 digests and a
presented key is looked up by its digest.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tomllib

from ipc.spec import SpecError, owner_uid

MIN_KEY_CHARS = 16


class ApiKeys:
    def __init__(self, owners: dict[str, int]):
        """`owners`: key -> owner uid."""
        self._by_digest = {_digest(k): uid for k, uid in owners.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def owner(self, presented: str) -> int | None:
        """The owner uid of a presented key, None if it is no key of this file."""
        return self._by_digest.get(_digest(presented))


def load_keys(path: str) -> ApiKeys:
    """Read and check a keys file; ValueError says what is wrong with it."""
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ValueError(f"{path} is readable by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):o}): chmod 600 it")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
    keys = data.get("keys")
    if set(data) != {"keys"} or not isinstance(keys, dict) or not keys:
        raise ValueError(f"{path}: want one [keys] table of \"KEY\" = \"owner\" lines")
    owners = {}
    for key, owner in keys.items():
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"{path}: a key of {len(key)} characters (at least {MIN_KEY_CHARS})")
        try:
            owners[key] = owner_uid(owner, f"keys.{key[:6]}...")
        except SpecError as e:
            raise ValueError(f"{path}: {e.message}") from None
    return ApiKeys(owners)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()

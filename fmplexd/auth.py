"""The daemon's one authorization rule.

A peer whose kernel-reported uid is U may act for a task owned by O (register it, serve it, map its
slot, remove it, relay commands to it, deploy it) if and only if
    U == O                      the tenant itself, or
    U == the daemon's own uid   the operator who runs fmplexd, or
    U == 0 and trust_root       root, unless the configuration says otherwise.
A peer with no known uid (no ZAP User-Id, e.g. a tcp:// peer) may act for nobody.
"""
from __future__ import annotations

import os

from ipc.errors import ErrorCode, FmplexError


class Authority:
    def __init__(self, trust_root: bool = True, daemon_uid: int | None = None):
        self.trust_root = trust_root
        self.daemon_uid = os.getuid() if daemon_uid is None else daemon_uid

    def allows(self, uid: int | None, owner_uid: int) -> bool:
        return uid is not None and (uid == owner_uid or uid == self.daemon_uid
                                    or (uid == 0 and self.trust_root))

    def check(self, uid: int | None, owner_uid: int, what: str) -> None:
        """Raise UNAUTHORIZED ("uid U may not <what>") unless `uid` may act for `owner_uid`."""
        if not self.allows(uid, owner_uid):
            raise FmplexError(ErrorCode.UNAUTHORIZED, f"uid {uid} may not {what}")

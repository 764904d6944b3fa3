"""The daemon's one authorization rule.

A peer whose kernel-reported uid is U may act for a task owned by O (register it, serve it, map its
slot, remove it, relay commands to it, deploy it) if and only if
    U == O                      the tenant itself, or
    U == the daemon's own uid   the operator who runs fmplexd, or
    U == 0 and trust_root       root, unless the configuration says otherwise.
A peer with no known uid (no ZAP User-Id, e.g. a tcp:// peer) may act for nobody.
The same rule decides what a peer sees: listings (list_tasks, info's slot regions) show it only the
tasks it may act for, so a tenant never learns another tenant's task names.

Reaching a task's ipc:// endpoint is narrower (tasklets.endpoint's ZAP policy): only its owner and
uid 0 connect there. `reaches` states that rule so the daemon can tell a refused caller why
instead of letting it wait on a connection that never completes.
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

    @staticmethod
    def reaches(uid: int | None, owner_uid: int) -> bool:
        """Whether `uid` may connect to a task's ipc:// endpoint (the endpoint's ZAP policy)."""
        return uid is not None and uid in (owner_uid, 0)

    def check(self, uid: int | None, owner_uid: int, what: str) -> None:
        """Raise UNAUTHORIZED ("uid U may not <what>") unless `uid` may act for `owner_uid`."""
        if not self.allows(uid, owner_uid):
            raise FmplexError(ErrorCode.UNAUTHORIZED, f"uid {uid} may not {what}")

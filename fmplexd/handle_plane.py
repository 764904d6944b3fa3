"""The daemon's handle-plane policy: who gets which region fds, and what a closed connection means.

OpenRegions(token) -> RegionsGranted + fds [backbone region (sealed, read-only), task slot], only to a
peer whose kernel-reported uid may act for the task's owner (fmplexd.auth). The connection stays
open for the task's life; its EOF means the process is gone, and the task's session ends at once.
"""
from __future__ import annotations

from typing import Callable

from fmplexd.families.base import Backbone
from fmplexd.sessions import Sessions
from ipc.errors import ErrorCode, FmplexError
from ipc.handles import Credentials
from ipc.messages import Message, OpenRegions, RegionsGranted


class HandlePolicy:
    def __init__(self, sessions: Sessions, backbone: Callable[[str], Backbone]):
        self.sessions, self.backbone = sessions, backbone

    def handle(self, msg: Message, creds: Credentials, conn_id: int) -> tuple[Message, list[int]]:
        if not isinstance(msg, OpenRegions):
            raise FmplexError(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not a handle-plane request")
        entry, slot = self.sessions.open_regions(msg.token, creds, conn_id)
        backbone = self.backbone(entry.config.backbone)
        reply = RegionsGranted(ref=msg.ref, backbone=backbone.manifest, slot_size=slot.size,
                               slot_generation=slot.generation)
        return reply, [backbone.fd, slot.fd]

    def closed(self, conn_id: int, creds: Credentials) -> None:
        self.sessions.connection_closed(conn_id, creds)

"""The daemon's handle-plane policy: who gets which region fds, and what a closed connection means.

OpenRegions(token) -> RegionsGranted + fds [backbone region (sealed, read-only), task slot], only to a
peer whose kernel-reported uid owns the task (or trusted root). The connection stays open for the
task's life; its EOF means the process is gone, and the task's session ends at once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from fmplexd import lifecycle
from ipc.errors import ErrorCode, FmplexError
from ipc.handles import Credentials
from ipc.messages import OpenRegions, RegionsGranted

if TYPE_CHECKING:
    from fmplexd.daemon import Daemon


def make_handler(d: "Daemon"):
    def handler(msg, creds: Credentials, conn_id: int):
        if not isinstance(msg, OpenRegions):
            raise FmplexError(ErrorCode.UNEXPECTED, f"{msg.TYPE} is not a handle-plane request")
        found = d.registry.by_token.get(msg.token)
        if found is None:
            raise FmplexError(ErrorCode.UNAUTHORIZED, "unknown or expired slot token")
        entry, slot = found
        if not lifecycle.may_act_for(d, creds.uid, entry.config.owner_uid):
            raise FmplexError(ErrorCode.UNAUTHORIZED,
                              f"uid {creds.uid} may not map the slot of task {entry.name}")
        d.registry.attach_conn(entry, conn_id)
        backbone = d.backbones[entry.config.backbone]
        reply = RegionsGranted(ref=msg.ref, backbone=backbone.manifest, slot_size=slot.size,
                               slot_generation=slot.generation)
        return reply, [backbone.fd, slot.fd]
    return handler


def make_on_close(d: "Daemon"):
    def on_close(conn_id: int, creds: Credentials) -> None:
        for entry in d.registry.closed_conn(conn_id):
            lifecycle.task_died(d, entry, f"process {creds.pid} closed its handle-plane connection")
    return on_close

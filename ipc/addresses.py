"""The address scheme: every socket of one daemon lives in its run directory.

    {run_dir}/control.sock          control socket (ROUTER, ipc://), operators and clients
    {run_dir}/tasks.sock            task plane (ROUTER, ipc://), task processes
    {run_dir}/handles.sock          handle plane (AF_UNIX SOCK_SEQPACKET), fds of shared memory
    {run_dir}/tenants/{uid}/        one directory per tenant, mode 0700, owned by the tenant
    {run_dir}/tenants/{uid}/{task}.sock   a task's client endpoint (ROUTER, ipc://)

`parse_listen` reads the HOST:PORT of fmplex's HTTP listeners (fmplexd's metrics, the gateway).

The run directory is FMPLEX_RUN_DIR if set, else /run/fmplex for root (systemd's RuntimeDirectory),
else $XDG_RUNTIME_DIR/fmplex, else /tmp/fmplex-{uid}. ipc:// paths may be at most 107 bytes long.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

MAX_IPC_PATH = 107


def parse_listen(value: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port); ValueError otherwise. Port 0 = any free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r}: want HOST:PORT")
    return host.strip("[]"), int(port)


def default_run_dir() -> str:
    if os.environ.get("FMPLEX_RUN_DIR"):
        return os.environ["FMPLEX_RUN_DIR"]
    if os.getuid() == 0:
        return "/run/fmplex"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "fmplex") if xdg else f"/tmp/fmplex-{os.getuid()}"


def ipc(path: str) -> str:
    if len(path.encode()) > MAX_IPC_PATH:
        raise ValueError(f"ipc path longer than {MAX_IPC_PATH} bytes: {path}")
    return "ipc://" + path


@dataclass(frozen=True, slots=True)
class RunDir:
    path: str

    @property
    def control(self) -> str:
        return ipc(os.path.join(self.path, "control.sock"))

    @property
    def tasks(self) -> str:
        return ipc(os.path.join(self.path, "tasks.sock"))

    @property
    def handles(self) -> str:
        return os.path.join(self.path, "handles.sock")

    def tenant_dir(self, uid: int) -> str:
        return os.path.join(self.path, "tenants", str(uid))

    def endpoint(self, uid: int, task: str) -> str:
        return ipc(os.path.join(self.tenant_dir(uid), f"{task}.sock"))


def socket_path(address: str) -> str:
    """The filesystem path of an ipc:// address."""
    if not address.startswith("ipc://"):
        raise ValueError(f"not an ipc address: {address}")
    return address[len("ipc://"):]

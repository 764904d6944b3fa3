"""fmplex: serve many customized tasks on shared foundation-model backbones.

The user-facing package: the client library, the `fmplex` command line and its demo.

    from fmplex import Client
    with Client() as c:
        reply = c.infer("sentiment", ["what a lovely day"])

Importing it imports no torch (the demo imports the daemon's training code only when it runs).
"""
from fmplex.client import AsyncClient, Client
from ipc.errors import (DaemonUnavailable, FmplexError, InvalidRequest, OverloadedError,
                        RequestTimeout, TaskUnavailable, Unauthorized, UnknownTask)

__all__ = ["Client", "AsyncClient", "FmplexError", "OverloadedError", "RequestTimeout",
           "TaskUnavailable", "DaemonUnavailable", "UnknownTask", "InvalidRequest", "Unauthorized"]

"""`fmplex gateway`: listen and serve the app with uvicorn.

Without an API keys file every caller acts as the gateway's own uid, so the gateway then refuses
to listen anywhere but loopback (127.0.0.0/8, ::1, localhost). It prints one line on stderr once
it serves: "fmplex gateway: serving http://HOST:PORT/v1 ..." (the bound port, when 0 was asked).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys

import uvicorn

from fmplex.gateway.app import MAX_BODY_BYTES, TIMEOUT_S, create_app
from fmplex.gateway.keys import load_keys
from ipc import aio
from ipc.addresses import parse_listen


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(listen: str, keys_path: str | None, run_dir: str | None,
          max_body: int = MAX_BODY_BYTES, timeout_s: float = TIMEOUT_S) -> int:
    """Run until SIGINT / SIGTERM. Exit status 0, or 2 for a set-up error (printed)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        host, port = parse_listen(listen)
        keys = load_keys(keys_path) if keys_path else None
    except (OSError, ValueError) as e:
        print(f"fmplex gateway: {e}", file=sys.stderr)
        return 2
    if keys is None and not is_loopback(host):
        print(f"fmplex gateway: refusing to listen on {host} without --api-keys (every caller "
              f"would act as uid {os.getuid()}); use a loopback address or give a keys file",
              file=sys.stderr)
        return 2
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as e:
        print(f"fmplex gateway: cannot listen on {listen}: {e}", file=sys.stderr)
        return 2
    bound = sock.getsockname()[1]
    where = f"[{host}]" if family == socket.AF_INET6 else host

    def ready():
        print(f"fmplex gateway: serving http://{where}:{bound}/v1 "
              f"({f'{len(keys)} API key(s)' if keys else 'no API keys: loopback only'})",
              file=sys.stderr, flush=True)
    app = create_app(run_dir, keys, max_body, timeout_s, on_ready=ready)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="on", timeout_graceful_shutdown=5))
    for sig in (signal.SIGINT, signal.SIGTERM):
        # uvicorn catches these while serving, shuts down gracefully, then raises the signal
        # again with the handlers found before: these, so the exit status stays 0
        signal.signal(sig, lambda *_: None)
    try:
        aio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    return 0

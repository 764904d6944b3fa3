"""`fmplexd`: run the backbone daemon (normally as a systemd Type=notify service)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from fmplexd.config import load_config
from fmplexd.sdnotify import Notifier


async def _serve(config, notify: Notifier) -> int:
    from fmplexd.daemon import Daemon
    daemon = Daemon(config, notify)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    await daemon.run()
    return 1 if daemon.failed else 0


def _short_slice(us: int) -> None:
    """Ask for a short EEVDF slice before any thread or child exists: the event loop, ZeroMQ's I/O
    threads, the lanes, the task zygote and every task process inherit it (fmplexd.cpu_slice)."""
    if not us:
        return
    from fmplexd.cpu_slice import set_slice_us
    try:
        set_slice_us(us)
    except OSError as e:
        logging.getLogger("fmplexd").warning("latency_slice_us = %d not applied: %s", us, e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fmplexd", description=__doc__)
    ap.add_argument("--config", help="TOML config file (default: built-in defaults)")
    ap.add_argument("--run-dir", help="directory of the daemon's sockets")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    notify = Notifier.from_environ()
    try:
        config = load_config(args.config, run_dir=args.run_dir)
    except (OSError, ValueError) as e:
        print(f"fmplexd: bad configuration: {e}", file=sys.stderr)
        return 2
    sys.setswitchinterval(config.gil_switch_ms / 1e3)
    _short_slice(config.latency_slice_us)
    from ipc import aio
    return aio.run(_serve(config, notify))


if __name__ == "__main__":
    sys.exit(main())

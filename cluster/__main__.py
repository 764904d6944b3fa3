"""Start or stop the cluster layer on a running Ray cluster (run on a node of it, e.g. the head's
systemd unit, packaging/fmplex-ray.service):

    python -m cluster start --config /etc/fmplex/cluster.toml [--address auto] [--wait 60]
    python -m cluster stop [--address auto] [--keep-state]
    python -m cluster snapshot [--address auto]          the controller's own view (JSON)

`start` creates the detached controller (or finds the running one) and returns once it has heard
from every host (--wait seconds at most); the driver then disconnects and the controller lives on.
`stop` ends the controller and its agents; the tasks keep running in each host's fmplexd.
Operators use `fmplex cluster ...` afterwards (no Ray needed on their machines).
Exit status: 0 ok, 1 not ready in time / no controller, 2 usage or set-up error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("start", "stop", "snapshot"))
    ap.add_argument("--address", default="auto", help="the Ray cluster (GCS host:port or auto)")
    ap.add_argument("--config", help="cluster.toml (start)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait until ready")
    ap.add_argument("--keep-state", action="store_true", help="stop: keep deploys in the GCS")
    args = ap.parse_args(argv)
    import ray

    from cluster import launch
    from cluster.config import NAMESPACE, load_cluster_config
    try:
        config = load_cluster_config(args.config) if args.action == "start" else None
    except (OSError, ValueError) as e:
        print(f"python -m cluster: {e}", file=sys.stderr)
        return 2
    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        if args.action == "stop":
            return 0 if launch.stop(forget=not args.keep_state) else 1
        if args.action == "start":
            handle = launch.start(config)
            deadline = time.monotonic() + args.wait
            while not ray.get(handle.snapshot.remote()).ready:
                if time.monotonic() > deadline:
                    print("the controller has not heard from every host yet", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            print(f"fmplex cluster service at {config.bind} (public key {config.server_public})")
            return 0
        snap = ray.get(launch.find().snapshot.remote())
        print(json.dumps(dataclasses.asdict(snap), indent=2))
        return 0
    except ValueError as e:                          # no controller (ray.get_actor)
        print(f"python -m cluster: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

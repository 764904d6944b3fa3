"""Starting, finding and stopping the controller from a Ray driver (`python -m cluster`, tests).

The controller is one detached actor named `fmplex-controller` in namespace "fmplex": created
once (get_if_exists: starting twice finds the first), restarted by Ray whenever its process dies
(max_restarts=-1; calls to it are retried meanwhile), pinned to `controller_host` when the
configuration names one (its service then keeps a fixed address: the clients' configuration).
It outlives the driver that started it; `stop` ends it and its agents.
"""
from __future__ import annotations

import ray

from cluster.config import CONTROLLER_NAME, NAMESPACE, ClusterConfig
from cluster.controller import Controller
from cluster.store import Store


def start(config: ClusterConfig, timeout_s: float = 120.0):
    """The controller actor, created if needed; returns once it runs (not yet `ready`: that
    waits for every host's first report)."""
    pin = {"label_selector": {config.host_label: config.controller_host}} \
        if config.controller_host else {}
    handle = ray.remote(Controller).options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=4, **pin,
    ).remote(config)
    ray.get(handle.snapshot.remote(), timeout=timeout_s)
    return handle


def find():
    """The running controller (raises ValueError if there is none)."""
    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)


def stop(forget: bool = True, timeout_s: float = 60.0) -> bool:
    """End the controller and its agents (the tasks keep running on their hosts' fmplexd);
    forget=True also drops the durable state. False if no controller was running."""
    try:
        handle = find()
    except ValueError:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle, no_restart=True)
        if forget:
            Store().clear()
    return True

"""The controller's durable state, in Ray's GCS key-value store (namespace "fmplex").

It survives a restart of the controller (its process, or its actor on another node); it does not
survive the loss of the head node unless Ray's GCS fault tolerance (an external Redis) is set up,
and neither does anything else of the cluster. What is kept is only what cannot be observed:

    task/NAME      the operator's ClusterDeploy message for the task (the one codec)
    wanted/NAME    replicas the autoscaler wants now (decimal)
    version        the route table's version and a digest of its content ("N DIGEST")

Everything else (where tasks run, their endpoints, load) is rebuilt from the agents' reports.
"""
from __future__ import annotations

from ray.experimental import internal_kv as kv

from ipc import codec
from ipc.messages import ClusterDeploy

NAMESPACE = "fmplex"


def _key(*parts: str) -> bytes:
    return "/".join(parts).encode()


class Store:
    def tasks(self) -> dict[str, ClusterDeploy]:
        """The deploys kept, by task name (a record that no longer decodes is skipped)."""
        out = {}
        for key in kv._internal_kv_list(b"task/", namespace=NAMESPACE):
            raw = kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw is None:
                continue
            try:
                msg = codec.decode([raw], frozenset({ClusterDeploy}))
            except codec.ProtocolError:
                continue
            out[key.decode()[len("task/"):]] = msg
        return out

    def put_task(self, name: str, msg: ClusterDeploy) -> None:
        kv._internal_kv_put(_key("task", name), codec.encode(msg)[0], namespace=NAMESPACE)

    def drop_task(self, name: str) -> None:
        kv._internal_kv_del(_key("task", name), namespace=NAMESPACE)
        kv._internal_kv_del(_key("wanted", name), namespace=NAMESPACE)

    def wanted(self) -> dict[str, int]:
        out = {}
        for key in kv._internal_kv_list(b"wanted/", namespace=NAMESPACE):
            raw = kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw is not None and raw.isdigit():
                out[key.decode()[len("wanted/"):]] = int(raw)
        return out

    def put_wanted(self, name: str, replicas: int) -> None:
        kv._internal_kv_put(_key("wanted", name), str(replicas).encode(), namespace=NAMESPACE)

    def version(self) -> tuple[int, str]:
        raw = kv._internal_kv_get(b"version", namespace=NAMESPACE)
        if not raw:
            return 0, ""
        number, _, digest = raw.decode().partition(" ")
        return int(number), digest

    def put_version(self, version: int, digest: str) -> None:
        kv._internal_kv_put(b"version", f"{version} {digest}".encode(), namespace=NAMESPACE)

    def clear(self) -> None:
        """Forget everything (the cluster is torn down)."""
        kv._internal_kv_del(b"", del_by_prefix=True, namespace=NAMESPACE)

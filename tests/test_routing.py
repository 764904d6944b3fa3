"""The routing client (fmplex/routing.py, through fmplex.Client(cluster=...)) against the real
cluster service (cluster/service.py) and real tcp:// + CURVE replica endpoints on loopback, no
Ray: the service is what the controller runs, its routes are published here by hand, and each
replica is a small ROUTER that answers `infer` with its own number (so a reply tells who served
it). Waits are on the service's count of waiting long polls and on replies, never on sleeps."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from cluster.service import Routes, Service
from fmplex.client import Client
from ipc import transport
from ipc.errors import DaemonUnavailable, TaskUnavailable, Unauthorized, UnknownTask
from ipc.messages import (ClusterStatus, ClusterStatusReply, Infer, InferReply, Ok,
                          RouteEndpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keys() -> tuple[str, str]:
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


class Replica(threading.Thread):
    """A task endpoint on tcp:// with CURVE that answers every `infer` with version = its id."""

    def __init__(self, ident: int):
        super().__init__(daemon=True)
        self.number, (self.public, self._secret) = ident, keys()
        self.ctx = zmq.Context()
        self.sock = transport.router(self.ctx, "tcp://127.0.0.1:*",
                                     curve_secret_key=self._secret.encode())
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.served = 0
        self.halt = threading.Event()
        self.start()

    def endpoint(self, host: str) -> RouteEndpoint:
        return RouteEndpoint(host=host, address=self.address, server_key=self.public)

    def run(self) -> None:
        while not self.halt.is_set():
            if not self.sock.poll(20):
                continue
            env = transport.recv_sync(self.sock, router_side=True)
            msg = env.decode(frozenset({Infer}))
            self.served += 1
            transport.send(self.sock, InferReply(
                ref=msg.ref, task="t", version=self.number, truncated=[False] * len(msg.texts),
                embeddings=np.zeros((len(msg.texts), 4), np.float32)), env.identity)
        self.sock.close(linger=0)                # the host is gone: its connections drop
        self.ctx.term()

    def kill(self) -> None:
        self.halt.set()
        self.join(10)


@pytest.fixture
def service():
    server, client, operator = keys(), keys(), keys()
    svc = Service(f"tcp://127.0.0.1:{_free_port()}", *server, operator_keys=(operator[0],),
                  client_keys=(client[0],),
                  operate=lambda m: ClusterStatusReply(ref=m.ref, version=7, hosts=[], tasks=[]))
    svc.start()
    svc.keys = {"server": server, "client": client, "operator": operator}
    replicas: list[Replica] = []
    svc.replica = lambda i: replicas.append(Replica(i)) or replicas[-1]
    yield svc
    for r in replicas:
        r.kill()
    svc.close()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(svc, who: str = "client", timeout_s: float = 5.0) -> Client:
    return Client(cluster=svc.bind, cluster_key=svc.keys["server"][0], keypair=svc.keys[who],
                  timeout_s=timeout_s)


def publish(svc, version: int, **routes) -> None:
    svc.publish(Routes(version, {t: tuple(eps) for t, eps in routes.items()}))


def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_calls_spread_over_the_replicas(service):
    a, b = service.replica(1), service.replica(2)
    publish(service, 1, t=[a.endpoint("n1"), b.endpoint("n2")])
    with client(service) as c:
        served_by = [c.infer("t", ["x"]).version for _ in range(60)]
    assert served_by.count(1) >= 10 and served_by.count(2) >= 10, served_by


def test_a_dead_replica_is_retried_once_elsewhere(service):
    a, b = service.replica(1), service.replica(2)
    publish(service, 1, t=[a.endpoint("n1"), b.endpoint("n2")])
    with client(service) as c:
        assert {c.infer("t", ["x"]).version for _ in range(20)} == {1, 2}
        a.kill()                                  # the table still lists it (not noticed yet)
        assert {c.infer("t", ["x"]).version for _ in range(20)} == {2}


def test_a_call_whose_only_replica_died_waits_for_the_new_placement(service):
    a, b = service.replica(1), service.replica(2)
    publish(service, 1, t=[a.endpoint("n1")])
    with client(service, timeout_s=10) as c:
        assert c.infer("t", ["x"]).version == 1
        a.kill()
        got = []
        call = threading.Thread(target=lambda: got.append(c.infer("t", ["x"]).version))
        call.start()
        until(lambda: service.waiting == 1)      # the client's long poll, avoiding n1
        publish(service, 2, t=[b.endpoint("n2")])
        call.join(10)
    assert got == [2]


def test_no_replica_in_time_and_a_second_failure_are_typed_errors(service):
    publish(service, 1, t=[])
    with client(service, timeout_s=1.0) as c:
        started = time.monotonic()
        with pytest.raises(TaskUnavailable):
            c.infer("t", ["x"])
        assert time.monotonic() - started < 3.0
        with pytest.raises(UnknownTask):
            c.infer("nothing-like-it", ["x"])
    a, b = service.replica(1), service.replica(2)
    publish(service, 2, t=[a.endpoint("n1"), b.endpoint("n2")])
    a.kill()
    b.kill()
    with client(service, timeout_s=3.0) as c:
        with pytest.raises(TaskUnavailable):      # tried two, both dead: no third, no hang
            c.infer("t", ["x"])


def test_only_known_keys_are_served_and_only_operators_command(service):
    publish(service, 1, t=[])
    with Client(cluster=service.bind, cluster_key=service.keys["server"][0], keypair=keys(),
                timeout_s=1.0) as stranger:
        with pytest.raises(DaemonUnavailable):
            stranger.infer("t", ["x"])
    with client(service) as c:
        with pytest.raises(Unauthorized):
            c.router.request(ClusterStatus(ref=1), 5)
    with client(service, "operator") as c:
        assert c.router.request(ClusterStatus(ref=1), 5).version == 7


def test_queries_before_the_first_table_wait_for_it(service):
    b = service.replica(2)
    got = []
    with client(service) as c:
        call = threading.Thread(target=lambda: got.append(c.infer("t", ["x"]).version))
        call.start()
        until(lambda: service.waiting == 1)
        publish(service, 1, t=[b.endpoint("n2")])
        call.join(10)
    assert got == [2]


def test_the_client_modules_import_no_ray_and_no_torch():
    code = ("import sys\nimport fmplex, fmplex.client, fmplex.routing, fmplex.cluster_cli, "
            "fmplex.cli\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120,
                         text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_an_operator_reply_passes_through(service):
    """The service hands operator messages to the controller's callback and relays its reply."""
    svc = Service(f"tcp://127.0.0.1:{_free_port()}", *service.keys["server"],
                  operator_keys=(service.keys["operator"][0],), client_keys=(),
                  operate=lambda m: Ok(ref=m.ref, message="done"))
    svc.start()
    try:
        with Client(cluster=svc.bind, cluster_key=service.keys["server"][0],
                    keypair=service.keys["operator"]) as c:
            assert c.router.request(ClusterStatus(ref=3), 5) == Ok(ref=3, message="done")
    finally:
        svc.close()

"""Finding tasks through a cluster: the client side of the controller's routing service.

    with Client(cluster="tcp://10.0.0.1:7400", cluster_key=SERVICE_PUBLIC_KEY,
                keypair=(MY_PUBLIC_KEY, MY_SECRET_KEY)) as c:
        reply = c.infer("sentiment", ["what a lovely day"])

Requests never go through the controller: it only tells where a task runs. Contract:

- Resolution. The controller's service (tcp:// + CURVE; docs/protocol.md §17) answers
  `route_query` with a task's serving replicas: each a tcp:// endpoint and the CURVE key its task
  process presents. The client keeps a task's route for ROUTE_TTL_S, then asks again (new replicas
  show up within that time, retired ones are drained by the controller for longer than that).
  A task the cluster does not know raises UnknownTask; one with no serving replica yet is waited
  for with a long poll, within the call's deadline. The controller being away (restarting) does
  not stop traffic: a refresh that gets no answer within REFRESH_TIMEOUT_S keeps the cached
  route for another ROUTE_TTL_S, and a query without a cached route is resent every RESEND_S
  (one sent to a controller that died before answering is lost) until the deadline.
- Spreading: power of two choices. Of two replicas drawn at random, the call goes to the one with
  fewer calls in flight from this client; on a tie (a one-thread client never has any) to the
  clearly better one by (1 + its host's load as last reported) x its latency EWMA (less than
  half the other's: a replica struggling), else to either at random (close figures are noise,
  and many clients that all chased the same lowest figure would stampede). A link's first call
  is not measured (it pays the connection's CURVE handshake), and an EWMA not refreshed fades
  (half-life DECAY_S), so a replica passed over is tried again.
- Failover, once. A call whose replica turns out dead (TaskUnavailable or DaemonUnavailable: its
  host or process is gone) is sent again to another replica within the same deadline: the client
  asks the service again with a long poll that avoids the dead endpoint, so a task whose only host
  died is retried as soon as the controller serves it elsewhere. A second failure, or none in
  time, raises the typed error. Inference is a pure function of its input, so a retry is safe;
  the caller still gets exactly one reply. The failed endpoint is passed over by later calls for
  SUSPECT_S while another replica serves.
- Never a hang: task links use ZMTP heartbeats (HEARTBEAT_MS), so a host that vanished without
  closing its connections shows as a disconnect, not as silence until the deadline.

No Ray here: a client needs only pyzmq.
"""
from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

import zmq

from ipc import transport
from ipc.errors import DaemonUnavailable, ErrorCode, TaskUnavailable, UnknownTask, error_for
from ipc.messages import Error, Message, RouteEndpoint, RouteQuery, RouteTable

ROUTE_TTL_S = 1.0
HEARTBEAT_MS = 500
EWMA_ALPHA = 0.3
DECAY_S = 2.0                    # half-life of a latency estimate that is not refreshed
SLOWER = 2.0                     # a replica this many times slower loses a tie
RETRY_RESERVE_S = 1.0            # of a deadline, kept for the call itself after waiting for a route
REFRESH_TIMEOUT_S = 0.5          # a refresh of a cached route waits no longer for the service
RESEND_S = 1.0                   # a route query unanswered this long (beyond its wait) is resent
SUSPECT_S = 3.0                  # an endpoint that failed is passed over this long (while others
                                 # serve; the controller drops a lost host's in about 1.5 s)
T = TypeVar("T")


class Link(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ClusterAccess:
    """Where the controller's service is and the CURVE keys to reach it (all Z85)."""
    address: str                 # tcp://HOST:PORT
    server_key: str              # the service's public key
    public: str                  # this client's key pair; the public key must be one the
    secret: str                  # cluster accepts (client_certs) and the tasks' authorized_keys

    @classmethod
    def from_certs(cls, address: str, server_cert: str, client_cert: str) -> "ClusterAccess":
        """From ZeroMQ certificate files (`fmplex cluster keygen`): the service's public
        certificate and this client's secret one."""
        import zmq.auth
        server, _ = zmq.auth.load_certificate(server_cert)
        public, secret = zmq.auth.load_certificate(client_cert)
        if not secret:
            raise ValueError(f"{client_cert} holds no secret key (use the .key_secret file)")
        return cls(address, server.decode(), public.decode(), secret.decode())

    def curve(self, server_key: str) -> tuple[bytes, bytes, bytes]:
        return server_key.encode(), self.public.encode(), self.secret.encode()


@dataclass(slots=True)
class _Replica:
    in_flight: int = 0
    ewma_s: float = 0.0
    calls: int = 0
    at: float = 0.0              # when ewma_s was last refreshed

    def observe(self, seconds: float, now: float) -> None:
        self.calls += 1
        if self.calls == 1:      # the link's first call paid its handshake: not a latency
            return
        self.ewma_s = seconds if self.ewma_s == 0 else (
            EWMA_ALPHA * seconds + (1 - EWMA_ALPHA) * self.ewma_s)
        self.at = now

    def latency(self, now: float) -> float:
        return self.ewma_s * 0.5 ** ((now - self.at) / DECAY_S)


@dataclass(slots=True)
class _Route:
    endpoints: list[RouteEndpoint]
    fetched: float
    version: int
    stats: dict[str, _Replica] = field(default_factory=dict)


class Router:
    """Routes of a cluster's tasks, and one link per replica endpoint (sync, one thread)."""

    def __init__(self, ctx: zmq.Context, access: ClusterAccess,
                 link: Callable[[str, tuple[bytes, bytes, bytes]], Link],
                 ttl_s: float = ROUTE_TTL_S, seed: int | None = None):
        """`link(address, curve)` opens a link to a task endpoint (the Client's kind)."""
        self.ctx, self.access, self._new_link, self.ttl_s = ctx, access, link, ttl_s
        self._rng = random.Random(seed)
        self._service: zmq.Socket | None = None
        self._routes: dict[str, _Route] = {}
        self._links: dict[tuple[str, str], Link] = {}
        self._suspect: dict[str, float] = {}            # endpoint address -> passed over until
        self._refs = itertools.count(1)

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
        if self._service is not None:
            self._service.close(linger=0)
            self._service = None

    # -- the service -----------------------------------------------------------------------------

    def request(self, msg: Message, timeout_s: float) -> Message:
        """One request/reply with the controller's service; Error replies raise (typed)."""
        if self._service is None:
            self._service = transport.dealer(self.ctx, self.access.address,
                                             curve=self.access.curve(self.access.server_key))
        try:
            reply = transport.request(self._service, msg, timeout_s)
        except TimeoutError:
            raise DaemonUnavailable(ErrorCode.DAEMON_UNAVAILABLE, f"the cluster service at "
                                    f"{self.access.address} did not answer within {timeout_s:.1f}s "
                                    f"(down, or our key is not accepted)") from None
        if isinstance(reply, Error):
            raise error_for(reply.code, reply.message)
        return reply

    def ref(self) -> int:
        return next(self._refs)

    def route(self, task: str, deadline: float, avoid: tuple[str, ...] = ()) -> list[RouteEndpoint]:
        """The task's serving endpoints other than `avoid`: cached for ttl_s; when there are none,
        a long poll until one serves, within the deadline (kept RETRY_RESERVE_S for the call)."""
        now = time.monotonic()
        cached = self._routes.get(task)
        if cached is not None and now - cached.fetched < self.ttl_s and not avoid:
            usable = cached.endpoints
        elif cached is not None and cached.endpoints and not avoid:
            try:                                     # refresh; the service may be away
                usable = self._query(task, min(deadline, now + REFRESH_TIMEOUT_S), (), wait=False)
            except DaemonUnavailable:
                cached.fetched = now
                usable = cached.endpoints
        else:
            usable = self._query(task, deadline, avoid, wait=False)
        if not usable:
            usable = self._query(task, deadline, avoid, wait=True)
        return usable

    def _query(self, task: str, deadline: float, avoid: tuple[str, ...],
               wait: bool) -> list[RouteEndpoint]:
        left = deadline - time.monotonic()
        end = time.monotonic() + max(left - min(RETRY_RESERVE_S, left / 2), 0.1)  # rest: the call
        while True:                         # a query is idempotent: asked again when its answer
            budget = end - time.monotonic()   # does not come (a restarting controller loses it)
            wait_s = min(max(budget - 0.25, 0.0), 60.0) if wait else 0.0
            try:
                table: RouteTable = self.request(
                    RouteQuery(ref=self.ref(), tasks=[task], wait_ms=int(wait_s * 1000),
                               avoid=list(avoid)),
                    timeout_s=max(min(wait_s + RESEND_S, budget), 0.05))
                break
            except DaemonUnavailable:
                if time.monotonic() >= end - 0.05:
                    raise
        route = next((r for r in table.routes if r.task == task), None)
        if route is None:
            raise UnknownTask(ErrorCode.UNKNOWN_TASK, f"the cluster runs no task {task}")
        self._update(task, route.endpoints, table.version)
        return [e for e in route.endpoints if e.address not in avoid]

    def _update(self, task: str, endpoints: list[RouteEndpoint], version: int) -> None:
        old = self._routes.get(task)
        stats = old.stats if old is not None else {}
        keep = {(e.address, e.server_key) for e in endpoints}
        for e in old.endpoints if old is not None else ():
            if (e.address, e.server_key) not in keep:        # retired or restarted: drop its link
                self._drop(e)
        kept = {e.address: stats.get(e.address, _Replica()) for e in endpoints}
        self._routes[task] = _Route(list(endpoints), time.monotonic(), version, kept)

    # -- calls -----------------------------------------------------------------------------------

    def call(self, task: str, timeout_s: float, attempt: Callable[[Link, float], T]) -> T:
        """Run `attempt(link, seconds left)` on a replica of the task, and once more on another
        if that replica turns out dead (see the module's docstring)."""
        deadline = time.monotonic() + timeout_s
        tried: tuple[str, ...] = ()
        while True:
            ep = self._choose(task, deadline, tried)
            stats = self._routes[task].stats.setdefault(ep.address, _Replica())
            stats.in_flight += 1
            start = time.monotonic()
            try:
                result = attempt(self._link(ep), deadline - start)
            except (TaskUnavailable, DaemonUnavailable):
                self._drop(ep)
                self._routes.pop(task, None)                 # ask the service again
                now = time.monotonic()
                self._suspect = {a: t for a, t in self._suspect.items() if t > now}
                self._suspect[ep.address] = now + SUSPECT_S
                tried += (ep.address,)
                if len(tried) > 1 or time.monotonic() >= deadline:
                    raise
                continue
            finally:
                stats.in_flight -= 1
            now = time.monotonic()
            stats.observe(now - start, now)
            return result

    def _choose(self, task: str, deadline: float, avoid: tuple[str, ...]) -> RouteEndpoint:
        endpoints = self.route(task, deadline, avoid)
        now = time.monotonic()
        trusted = [e for e in endpoints if self._suspect.get(e.address, 0.0) <= now]
        endpoints = trusted or endpoints
        if not endpoints:
            raise TaskUnavailable(ErrorCode.TASK_UNAVAILABLE,
                                  f"no serving replica of {task} within the deadline")
        if len(endpoints) == 1:
            return endpoints[0]
        a, b = self._rng.sample(endpoints, 2)
        stats = self._routes[task].stats
        ra, rb = stats.setdefault(a.address, _Replica()), stats.setdefault(b.address, _Replica())
        if ra.in_flight != rb.in_flight:
            return a if ra.in_flight < rb.in_flight else b
        la, lb = ra.latency(now), rb.latency(now)
        measured = la > 0 and lb > 0
        ca, cb = (1 + a.load) * (la if measured else 1), (1 + b.load) * (lb if measured else 1)
        if max(ca, cb) > SLOWER * min(ca, cb):
            return a if ca < cb else b
        return a                                     # a random one of the two

    def _link(self, e: RouteEndpoint) -> Link:
        key = (e.address, e.server_key)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = self._new_link(e.address, self.access.curve(e.server_key))
        return link

    def _drop(self, e: RouteEndpoint) -> None:
        link = self._links.pop((e.address, e.server_key), None)
        if link is not None:
            link.close()

    def replicas(self, task: str) -> list[str]:
        """Hosts of the task's cached route (for tools and tests)."""
        route = self._routes.get(task)
        return [e.host for e in route.endpoints] if route is not None else []

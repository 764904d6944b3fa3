"""Scheduler benchmark: time to form one batch with 1,000 backlogged tasks (goal <= 100 us p50).

    python -m bench.scheduler [--quick] [--out DIR] [--profile]

fmplexd.scheduler.Scheduler with the daemon's defaults (token_budget 4096, max_requests 256) and
1,000 tasks of random weights (log-uniform in [0.1, 10]), each kept backlogged: after every batch
the requests taken from a task are replaced by new ones (16-64 tokens each), outside the timed
region. The caller's clock is simulated: each batch advances it by STEP_S (a forward of 4,096 tokens
takes at least that long), and requests carry the daemon's default deadline of 10 s, so after the
warm-up the deadline heap is in steady state and each form_batch also pops the stale deadline
entries of requests taken about 10 s earlier (the daemon's real path; expiry runs inside
form_batch). Reports p50/p99 of form_batch over >= 500 batches, requests per batch, and the cost of
submit() (timed per call, and amortised over each refill). --profile (always on when the goal is
missed) prints where the time goes according to cProfile.

Machine speed. The VMs this runs on alternate between two speeds about 2x apart (a plain Python loop
takes 14 or 31 ms, with no steal time reported). So right after each timed form_batch the benchmark times
a fixed pure-Python reference loop; a batch counts as "at full speed" when its reference ran within
REF_FAST of the fastest reference. The verdict is the p50 of the batches at full speed (the code's
cost, not the host's mood); the p50 of all batches and the share at full speed are printed with it.
"""
from __future__ import annotations

import cProfile
import gc
import io
import pstats
import random
import time

from bench import common

from fmplexd.scheduler import Request, Scheduler

GOAL_US = 100.0
TASKS = 1000
BACKLOG = 4                    # requests queued per task, refilled after each batch
COST = (16, 64)                # tokens per request
WEIGHTS = (0.1, 10.0)          # log-uniform
DEADLINE_S = 10.0              # the daemon's default deadline_ms
STEP_S = 0.02                  # simulated time between two batches
SEED = 0
REF_LOOP = 2000                # iterations of the reference loop (about 100 us at full speed)
REF_FAST = 1.25                # a reference within 1.25x of the fastest one: full speed
MIN_FAST = 100                 # full-speed batches needed to judge on them (else: all batches)


def reference_ns() -> int:
    """Time a fixed pure-Python loop: the machine's current speed, in the same units."""
    perf = time.perf_counter_ns
    t0 = perf()
    acc = 0
    for i in range(REF_LOOP):
        acc += i * i
    return perf() - t0


def make(rng: random.Random) -> tuple[Scheduler, list]:
    s = Scheduler(token_budget=4096, max_requests=256)       # fmplexd.config.DaemonConfig defaults
    keys = list(range(TASKS))
    for k in keys:
        s.add_task(k, WEIGHTS[0] * (WEIGHTS[1] / WEIGHTS[0]) ** rng.random(), queue_limit=256)
    for k in keys:
        for _ in range(BACKLOG):
            s.submit(Request(k, rng.randint(*COST), DEADLINE_S, None, 0.0))
    return s, keys


def run(batches: int, warmup: int, profile: cProfile.Profile | None = None) -> dict:
    """Form warmup + batches batches; time the last `batches` (form_batch and submit)."""
    rng = random.Random(SEED)
    s, _ = make(rng)
    lo, hi = COST
    form_ns, sizes, tokens, expired, submit_ns, refill_ns, refills = [], [], [], [], [], 0, 0
    ref_ns = []
    perf = time.perf_counter_ns
    now = 0.0
    for i in range(warmup + batches):
        now += STEP_S
        timed = i >= warmup
        if timed and profile is not None:
            profile.enable()
        t0 = perf()
        batch = s.form_batch(now)
        t1 = perf()
        if timed and profile is not None:
            profile.disable()
        if timed:                       # after, not before: the loop would evict form_batch's data
            ref_ns.append(reference_ns())
        # Refill (not timed as form_batch): one new request per request taken or expired, same
        # task. Low-weight tasks do see expiries: at saturation a weight-0.1 task among 1,000 is
        # served about one request per 4 s, so its 4th queued request outlives a 10 s deadline.
        new = [Request(r.task, rng.randint(lo, hi), now + DEADLINE_S, None, now)
               for r in batch.requests + batch.expired]
        if timed:
            form_ns.append(t1 - t0)
            sizes.append(len(batch.requests))
            expired.append(len(batch.expired))
            tokens.append(batch.tokens)
            r0 = perf()
            for req in new:
                a = perf()
                s.submit(req)
                submit_ns.append(perf() - a)
            refill_ns += perf() - r0
            refills += len(new)
        else:
            for req in new:
                s.submit(req)
    if s.queued != TASKS * BACKLOG:
        raise AssertionError(f"{s.queued} queued, expected {TASKS * BACKLOG}")
    return {"form_ns": form_ns, "sizes": sizes, "tokens": tokens, "expired": expired,
            "submit_ns": submit_ns, "ref_ns": ref_ns,
            "submit_amortised_ns": refill_ns / max(refills, 1)}


def pct(values: list, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def profile_report(batches: int, warmup: int) -> str:
    prof = cProfile.Profile()
    run(batches, warmup, prof)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    return buf.getvalue()


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of form_batch")
    args = ap.parse_args()
    out = common.out_dir(args.out, "scheduler")
    batches = 600 if args.quick else 3000
    warmup = int(DEADLINE_S / STEP_S) + 100         # the deadline heap reaches steady state
    gc.collect()
    r = run(batches, warmup)
    form_us = [x / 1e3 for x in r["form_ns"]]
    sub_us = [x / 1e3 for x in r["submit_ns"]]
    ref_min = min(r["ref_ns"])
    fast_us = [f for f, ref in zip(form_us, r["ref_ns"]) if ref <= REF_FAST * ref_min]
    judged = fast_us if len(fast_us) >= MIN_FAST else form_us
    p50, p99 = pct(judged, 50), pct(judged, 99)
    all50, all99 = pct(form_us, 50), pct(form_us, 99)
    per_batch = sum(r["sizes"]) / len(r["sizes"])
    ok = p50 <= GOAL_US
    profile = profile_report(min(batches, 600), warmup) if (args.profile or not ok) else ""
    if profile:
        print(profile)
    results = {
        "config": {"tasks": TASKS, "backlog_per_task": BACKLOG, "cost_tokens": list(COST),
                   "weights_log_uniform": list(WEIGHTS), "token_budget": 4096,
                   "max_requests": 256, "deadline_s": DEADLINE_S, "step_s": STEP_S,
                   "batches": batches, "warmup": warmup, "seed": SEED, "quick": args.quick},
        "form_batch_us": {"p50": p50, "p90": pct(judged, 90), "p99": p99,
                          "mean": sum(judged) / len(judged), "max": max(judged),
                          "judged_on": "full speed" if judged is fast_us else "all batches"},
        "form_batch_all_batches_us": {"p50": all50, "p99": all99, "max": max(form_us)},
        "machine_speed": {"reference_us_min": ref_min / 1e3,
                          "reference_us_p50": pct(r["ref_ns"], 50) / 1e3,
                          "batches_at_full_speed": len(fast_us), "batches": len(form_us)},
        "requests_per_batch": per_batch,
        "tokens_per_batch": sum(r["tokens"]) / len(r["tokens"]),
        "expired_per_batch": sum(r["expired"]) / len(r["expired"]),
        "form_batch_us_per_request": p50 / per_batch,
        "submit_us": {"p50": pct(sub_us, 50), "p99": pct(sub_us, 99),
                      "amortised": r["submit_amortised_ns"] / 1e3, "calls": len(sub_us)},
        "goal": {"form_batch_p50_us_max": GOAL_US, "pass": ok},
        "profile": profile,
    }
    common.write_json(out, "scheduler.json", results)
    m = common.machine()
    where = results["form_batch_us"]["judged_on"]
    rows = [
        [f"form_batch p50 (1,000 backlogged tasks; {where})", f"{p50:.1f} us",
         f"<= {GOAL_US:g} us", common.verdict(ok)],
        [f"form_batch p99 ({where})", f"{p99:.1f} us", "", ""],
        ["form_batch p50 / p99 (all batches)", f"{all50:.1f} / {all99:.1f} us", "", ""],
        ["batches at full speed (reference loop within "
         f"{REF_FAST:g}x of its fastest, {ref_min / 1e3:.0f} us)",
         f"{len(fast_us)} of {len(form_us)}", "", ""],
        ["form_batch per request taken (p50 / requests)", f"{p50 / per_batch:.2f} us", "", ""],
        ["requests / tokens per batch",
         f"{per_batch:.1f} / {results['tokens_per_batch']:.0f}", "", ""],
        ["requests expired per batch (low-weight tasks, 10 s deadline)",
         f"{results['expired_per_batch']:.2f}", "", ""],
        ["submit() p50 / p99 (timed per call)",
         f"{results['submit_us']['p50']:.2f} / {results['submit_us']['p99']:.2f} us", "", ""],
        ["submit() amortised over refills", f"{results['submit_us']['amortised']:.2f} us", "", ""],
        ["batches timed (after warm-up)", f"{batches} (warm-up {warmup})", ">= 500", ""],
        ["load average (1 min) / cpus", f"{m['loadavg_1m']} / {m['cpus']}", "", ""],
    ]
    common.print_table(["metric", "value", "goal", "result"], rows,
                       title="scheduler: form_batch with 1,000 backlogged tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The generated serving section of docs/benchmarks.md (write_doc, between DOC_BEGIN and DOC_END;
the rest of the file is kept) and the sentences computed from the figures: analysis() for the doc,
notes() for facts serve.json states next to the figures (restarts, a late load driver, outputs
that differ). Nothing here is written by hand about the results: every figure comes from them."""
from __future__ import annotations

import os

import numpy as np

from bench.servebench.plan import SYSTEMS
from bench.servebench.report import capacity_table, fmt_ms, markdown_table, profile_table, tables
from bench.workload import WorkloadSpec


def markers(section: str = "") -> tuple[str, str]:
    """The begin and end lines of a generated section ("" = the main run's)."""
    name = f"bench/serve.py{' ' + section if section else ''}"
    return f"<!-- {name}: begin (generated; do not edit by hand) -->", f"<!-- {name}: end -->"


DOC_BEGIN, DOC_END = markers()


def write_doc(path: str, results: dict, command: str, section: str = "") -> None:
    """Regenerate one serving section of docs/benchmarks.md (`section` names a variant run;
    other sections are kept)."""
    DOC_BEGIN, DOC_END = markers(section)
    head, rows, ghead, grows = tables(results)
    m, r = results["machine"], results
    prof = r.get("profile", {})
    title = "## Serving: fmplex vs one model instance per task" + (f" ({section})" if section else "")
    lines = [DOC_BEGIN, title, "",
             "Produced by:", "", "```", command, "```", "",
             f"Machine: {m['cpus']} CPUs ({m['platform']}), Python {m['python']}, 1-minute load "
             f"average {r.get('loadavg_1m_at_start', '?')} at the start, {m['time']} at the end, "
             f"{r['wall_s']:.0f} s in all. Backbone: all-MiniLM-L6-v2 (float32; every system on "
             f"the CPU).",
             "", "### Set-up", "",
             f"- Workload: {r['workload']['description']}; offered loads "
             f"{', '.join(f'{f:.0%}' for f in r['plan']['load_fractions'])} of fmplex's measured "
             f"saturation throughput ({r['saturation_rps']:.1f} req/s) = "
             f"{', '.join(f'{x:.1f}' for x in r['loads_rps'])} req/s; {r['plan']['duration_s']:g} s "
             f"of arrivals per point.",
             f"- Tasks: {r['tasks']['description']}",
             f"- fmplex: {r['placement']['fmplex']}",
             f"- co-located: {r['placement']['co-located']['how']}",
             f"- partitioned: {r['placement']['partitioned']['how']}",
             f"- Baseline serving: {r['baseline_serving']}",
             f"- SLO reference: batch-1 latency of a dedicated instance by input length "
             f"(ms: {', '.join(f'{k} tok {v}' for k, v in r['b1_ms_by_tokens'].items())}).",
             f"- Outputs agree across the three systems: {r['outputs_agree']}.", "",
             "### Results", "", markdown_table(head, rows).rstrip(), "",
             "### Memory and capacity", "", markdown_table(*capacity_table(results)).rstrip(), "",
             "### Goals", "", markdown_table(ghead, grows).rstrip(), "",
             "Plots (in --out): latency_vs_load.png, slo_attainment.png, capacity.png.", ""]
    if prof:
        lines += ["### Where the time goes (daemon loop profile)", "",
                  markdown_table(*profile_table(prof)).rstrip(), "", prof.get("note", ""), ""]
    lines += ["### Analysis", "", *analysis(results), DOC_END]
    text = "\n".join(lines) + "\n"
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    if DOC_BEGIN in old and DOC_END in old:
        pre, rest = old.split(DOC_BEGIN, 1)
        post = rest.split(DOC_END, 1)[1].lstrip("\n")
        new = pre + text + ("\n" + post if post else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)
    print(f"wrote {path}")


def analysis(results: dict) -> list[str]:
    """Sentences computed from the figures (the doc is regenerated, never edited)."""
    g, cap, prof, plan = results["goals"], results["capacity"], results.get("profile", {}), \
        results["plan"]
    n, alpha, frac = plan["n_tasks"], g["alpha"], g["load_fraction"]
    rate = results["loads_rps"][plan["load_fractions"].index(frac)]
    p = g["p99_ms"]
    out = [f"- Headline (alpha {alpha:g}, {rate:.1f} req/s = {frac:.0%} of fmplex's saturation): "
           f"p99 {fmt_ms(p['fmplex'])} ms fmplex, {fmt_ms(p['co-located'])} ms co-located, "
           f"{fmt_ms(p['partitioned'])} ms partitioned (n/a: more than 1% of the requests "
           f"failed, or the point was not run because a lower load already failed most)."]
    sat = prof.get("scenarios", {}).get("saturated")
    if sat:
        out.append(f"- fmplex throughput: the daemon's forward alone sustains "
                   f"{sat['throughput_rps']:.0f} req/s on {prof['threads']} torch thread(s) "
                   f"(in-process, batches of {sat['requests_per_batch']:.0f}); end to end the burst "
                   f"saturation was {results['saturation_rps']:.0f} req/s. The difference is the "
                   f"request path sharing the other core(s): task processes (tokenize, codec), four "
                   f"ZeroMQ hops per request and the load driver itself.")
    loaded = [v for k, v in prof.get("scenarios", {}).items() if k != "saturated"]
    if loaded:
        sc = loaded[0]
        out.append(f"- fmplex latency is forward time: at a moderate load the daemon runs batches of "
                   f"{sc['requests_per_batch']:.1f} requests ({sc['tokens_per_batch']:.0f} tokens) "
                   f"in {sc['ms_per_batch']:.0f} ms, so a request waits for the batch in progress "
                   f"and runs in the next (p50 of one to two batch times); at high load the queue "
                   f"grows and batches grow to the daemon's token budget "
                   f"({prof.get('token_budget_at_end', '?')} tokens here, sized to about "
                   f"{prof.get('batch_target_ms', '?')} ms per batch).")
    for name, sc in prof.get("scenarios", {}).items():
        sh = sc["share"]
        out.append(f"- Daemon loop, {name}: {sc['ms_per_batch']:.1f} ms per batch of "
                   f"{sc['requests_per_batch']:.1f} requests ({sc['tokens_per_batch']:.0f} tokens): "
                   f"forward {100 * sh['forward']:.1f}%, packing {100 * sh['pack']:.1f}%, "
                   f"outputs {100 * sh['outputs']:.1f}%, batch formation {100 * sh['form']:.2f}%, "
                   f"collect (decode, validate, queue) {100 * sh['collect']:.1f}%, delivery (encode "
                   f"Results) {100 * sh['deliver']:.1f}%; the LoRA segments are "
                   f"{100 * sc.get('lora_share_of_forward', 0):.0f}% of the forward.")
    if "request_path" in prof:
        rp = prof["request_path"]
        out.append(f"- Per request outside the forward (in-process): tokenize {rp['tokenize_us']:.0f} "
                   f"us, post-process {rp['postprocess_us']:.0f} us, codec of Infer + Submit + "
                   f"Result + InferReply {rp['codec_us']:.0f} us.")
    co = results["placement"]["co-located"]
    if "default thread count" in co["how"]:
        out.append(f"- co-located: {n} instances each run torch's default intra-op thread count "
                   f"({co.get('threads_each', '?')}) on {results['machine']['cpus']} cores. Every "
                   f"operator of a forward is an OpenMP parallel region whose threads must all run; "
                   f"with several instances busy the threads are oversubscribed, spin at barriers "
                   f"and wait for each other to be scheduled, so throughput collapses well below "
                   f"what the same processes reach one at a time. This is the cost of co-location "
                   f"without coordination (run with --colocated-threads 1 to see co-location with "
                   f"coordinated thread counts).")
    part = results["placement"]["partitioned"]["how"]
    b1 = results["b1_ms_by_tokens"]
    b1_20 = float(np.interp(20, [int(k) for k in b1], list(b1.values())))
    if "CFS quota" in part:
        share = float(part.split("CFS quota of ")[1].split(" ")[0])
        hot = WorkloadSpec(n_tasks=n, alpha=alpha).shares()[0]
        need = rate * hot * b1_20 / 1e3
        out.append(f"- partitioned: a slice of {share:.3g} CPU stretches a batch-1 forward of "
                   f"~{b1_20:.0f} ms (20 tokens) to at least {b1_20 / share:.0f} ms; the most "
                   f"popular task ({hot:.0%} of the requests at alpha {alpha:g}) needs about "
                   f"{need:.2f} CPU at the headline load against its {share:.3g}, so its queue "
                   f"{'grows without bound' if need > share else 'runs hot'} while other slices "
                   f"idle: a fixed partition cannot lend idle capacity to the busy task.")
    fm, bl = results["systems"]["fmplex"]["memory"], results["systems"]["co-located"]["memory"]
    out.append(f"- Memory: fmplex costs {cap['fmplex']['fixed_mib']:.0f} MiB once (the daemon: "
               f"torch and the one backbone copy; {fm['daemon']['pss_mib']:.0f} MiB at {n} tasks; "
               f"its task zygote {fm.get('zygote', {}).get('pss_mib', 0):.0f} MiB) "
               f"plus {cap['fmplex']['per_task_mib']:.1f} MiB per task (a task process is "
               f"{fm['tasks']['mean_pss_mib']:.1f} MiB PSS: forked from the zygote, it shares the "
               f"interpreter, numpy, pyzmq and the tokenizer copy-on-write; no torch, no weights; "
               f"the rest is the daemon's per-task state and slot); a model "
               f"instance costs {cap['co-located']['per_task_mib']:.0f} MiB ({bl['instances']['mean_pss_mib']:.0f} "
               f"MiB PSS each at {n}: torch's runtime, a private backbone copy, the tokenizer). "
               f"Within {plan['budget_gib']:g} GiB: {cap['fmplex']['hosted']} vs "
               f"{cap['co-located']['hosted']} tasks ({g['capacity_ratio']:.1f}x; "
               f"{'verified' if cap['fmplex']['verified'] else 'extrapolated'} / "
               f"{'verified' if cap['co-located']['verified'] else 'extrapolated'}).")
    out += [f"- {line}" for line in results.get("notes", [])]
    return out


def notes(results: dict) -> list[str]:
    """Facts worth stating next to the figures."""
    out = []
    restarts = results["systems"]["fmplex"].get("task_restarts", 0)
    if restarts:
        out.append(f"fmplex task processes were restarted {restarts} time(s) during the load runs "
                   f"(see the daemon's log: a task that misses heartbeats is declared dead)")
    for name in SYSTEMS:
        lag = max(r["driver_lag_p99_ms"] for r in results["systems"][name]["runs"])
        if lag > 20:
            out.append(f"the load driver ran up to {lag:.0f} ms late (p99) while driving {name}: "
                       f"the machine's CPUs were saturated, so arrivals bunched up")
    if not results.get("outputs_agree", True):
        out.append("the three systems' outputs differed on the probe inputs (see probe_outputs)")
    return out

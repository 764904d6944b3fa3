#!/usr/bin/env python3
"""Generation benchmark: many LoRA tasks on SmolLM2-135M-Instruct, fmplex vs static batching with
transformers + PEFT, vs one transformers process per task, with llama.cpp as a reference point.

    python -m bench.generate [--quick] [--out DIR] [--tasks 8,32] [--threads T] [--no-colocated]

Workload (bench/genbench/workload.py, fixed seed): N LoRA tasks (rank 16 on all 7 modules) of zipf
popularity; prompts of 32-256 tokens, outputs of 16-128 (end-of-sequence ignored); the same
requests and the same torch thread count for every system. Phases, for each N:
  1. saturation: every request sent at once; output tokens/s (fmplex's KV pool sampled meanwhile:
     blocks in use vs allocated, and the tokens they hold);
  2. load: Poisson arrivals at 50% and 80% of fmplex's saturation request rate, the same arrivals
     for every system; TTFT (first token at the client) and TPOT p50/p99.
Then, on fmplex alone: served tokens of three tasks weighted 1:2:4 under saturation; and in-process
the LoRA overhead of a 32-row decode step (8 distinct rank-16 adapters vs the base), and the int8
dtype against float32 (decode tokens/s at batch 1, share of greedy steps agreeing). llama.cpp
(node-llama-cpp, prebuilt CPU binary) runs the base GGUF single-stream and with parallel sequences
when it is installed (bench/genbench/llamacpp/; see docs/benchmarks.md).

--quick: a tiny random Llama, 4 tasks and a few requests (the smoke test). Prints the tables last
and writes generate.json to --out.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys

from bench import common
from bench.genbench import fairness, int8, micro, plan as plans
from bench.genbench.colocated import Colocated
from bench.genbench.fmplex_gen import FmplexGen
from bench.genbench.hf_static import HfStatic
from bench.genbench.records import as_dicts, summarize
from bench.genbench.workload import requests
from testkit.launch import short_tmpdir


def _backbone(plan, work: str):
    """(fmplexd path, HF directory, gguf file name or None, tokenizer path, config dict)."""
    import json
    if plan.tiny:
        from testkit.tiny import write_tiny_llama
        d = write_tiny_llama(os.path.join(work, "tiny-llama"))
        with open(os.path.join(d, "config.json")) as f:
            return d, d, None, os.path.join(d, "tokenizer.json"), json.load(f)
    from fmplexd.families.decoder.gguf import read_metadata, tokenizer_from_metadata
    from fmplexd.families.embedded import resolve
    path = resolve(plan.backbone)
    md = read_metadata(path)
    tok = os.path.join(work, "tokenizer.json")
    tokenizer_from_metadata(md).save(tok)
    arch = md["general.architecture"]
    cfg = {"hidden_size": md[f"{arch}.embedding_length"], "num_hidden_layers": md[f"{arch}.block_count"],
           "intermediate_size": md[f"{arch}.feed_forward_length"],
           "num_attention_heads": md[f"{arch}.attention.head_count"],
           "num_key_value_heads": md[f"{arch}.attention.head_count_kv"]}
    return path, os.path.dirname(path), os.path.basename(path), tok, cfg


def _systems(plan, n: int, paths, adapters, work: str):
    path, hf_dir, gguf, _, _ = paths
    yield "fmplex", lambda: FmplexGen(plan, path, adapters[:n], os.path.join(work, f"fmx{n}"))
    yield "static", lambda: HfStatic(hf_dir, gguf, adapters[:n], plan.threads, plan.static_batch)
    if plan.colocated and n <= plan.colocated_max_tasks:
        yield "co-located", lambda: Colocated(hf_dir, gguf, adapters[:n])


def run_tasks(plan, n: int, paths, adapters, tok, work: str) -> dict:
    sat_reqs = requests(tok, n, None, 1.0, plan.saturation_requests, plan.seed, prompt=plan.prompt,
                        output=plan.output)
    out = {"systems": {}, "loads": {}}
    rates: dict[float, float] = {}
    for name, make in _systems(plan, n, paths, adapters, work):
        print(f"[{n} tasks] {name}: starting", file=sys.stderr, flush=True)
        system = make().start()
        try:
            if name == "fmplex":
                recs, wall, kv = system.run(sat_reqs, sample_kv=True)
                out["kv"] = _kv(kv)
            else:
                recs, wall = system.run(sat_reqs)
            sat = summarize(recs, wall)
            out["systems"][name] = {"saturation": sat, "loads": {}}
            if name == "fmplex":
                capacity_rps = sat["ok"] / wall
                rates = {f: f * capacity_rps for f in plan.load_fractions}
                out["capacity_rps"] = capacity_rps
            for f, rate in rates.items():
                reqs = requests(tok, n, rate, plan.load_duration_s, None, plan.seed + 1,
                                prompt=plan.prompt, output=plan.output)
                print(f"[{n} tasks] {name}: load {f:.0%} ({rate:.2f} req/s, {len(reqs)} requests)",
                      file=sys.stderr, flush=True)
                recs, wall = system.run(reqs)[:2]
                out["systems"][name]["loads"][str(f)] = summarize(recs, wall)
                out["systems"][name]["loads"][str(f)]["records"] = as_dicts(recs)
        finally:
            system.close()
    return out


def _kv(samples: list) -> dict:
    busy = [s for s in samples if s[0] > 0]
    if not busy:
        return {"samples": len(samples)}
    util = [tokens / (used * block) for used, _, tokens, block, _ in busy]
    return {"samples": len(samples), "blocks_total": busy[0][1],
            "blocks_used_peak": max(s[0] for s in busy),
            "blocks_used_mean": sum(s[0] for s in busy) / len(busy),
            "sequences_peak": max(s[4] for s in busy),
            "utilization_mean": sum(util) / len(util), "utilization_min": min(util)}


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--tasks", default=None, help="task counts, e.g. 8,32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-colocated", action="store_true")
    args = ap.parse_args(argv)
    plan = dataclasses.replace(plans.QUICK if args.quick else plans.FULL)
    if args.tasks:
        plan = dataclasses.replace(plan, task_counts=tuple(int(x) for x in args.tasks.split(",")))
    if args.threads:
        plan = dataclasses.replace(plan, threads=args.threads)
    plan = dataclasses.replace(plan, colocated=not args.no_colocated)
    out_dir = common.out_dir(args.out, "generate")
    work = short_tmpdir("fmx-gen-")
    try:
        import torch
        from tokenizers import Tokenizer

        from fmplexd.families import load_backbone
        from testkit.tiny import write_random_llama_lora
        torch.set_num_threads(plan.threads)
        paths = _backbone(plan, work)
        tok = Tokenizer.from_file(paths[3])
        n_max = max(plan.task_counts)
        adapters = [write_random_llama_lora(os.path.join(work, f"lora{i}"), paths[4], plan.rank,
                                            seed=i) for i in range(max(n_max, micro.ADAPTERS))]
        results = {"plan": dataclasses.asdict(plan), "command": " ".join(sys.argv), "tasks": {}}
        print("LoRA overhead (in-process, 32-row decode step)", file=sys.stderr, flush=True)
        bb = load_backbone("llm", paths[0], "float32", os.path.join(work, "bb"))
        results["lora_overhead"] = micro.lora_overhead(bb, adapters, plan.micro_steps)
        del bb
        print("int8 vs float32 (in-process, batch 1)", file=sys.stderr, flush=True)
        prompts = [r.ids for r in requests(tok, 1, None, 1.0, plan.int8_prompts, plan.seed,
                                           prompt=plan.prompt, output=plan.output)]
        results["int8"] = int8.int8_vs_float32(paths[0], prompts, plan.int8_steps,
                                               os.path.join(work, "int8"))
        for n in plan.task_counts:
            results["tasks"][str(n)] = run_tasks(plan, n, paths, adapters, tok, work)
        results["fairness"] = _fairness(plan, paths, tok, work)
        from bench.genbench import llamacpp
        results["llamacpp"] = llamacpp.run(paths, plan)
        results["goals"] = goals(results, plan)
        common.write_json(out_dir, "generate.json", results)
        tables(results, plan)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fairness(plan, paths, tok, work: str) -> dict:
    system = FmplexGen(plan, paths[0], [None] * len(fairness.WEIGHTS), os.path.join(work, "fair"),
                       weights=list(fairness.WEIGHTS)).start()
    try:
        text = requests(tok, 1, None, 1.0, 1, plan.seed, prompt=(64, 64), output=(48, 48))[0].text
        return fairness.weighted_shares(system, plan.fairness_s,
                                        plan.max_sequences + 8, text)
    finally:
        system.close()


def goals(r: dict, plan) -> dict:
    n = str(max(plan.task_counts))
    t = r["tasks"][n]["systems"]
    fm, st = t["fmplex"], t["static"]
    half = str(min(plan.load_fractions))
    thr = fm["saturation"]["output_tokens_per_s"] / max(st["saturation"]["output_tokens_per_s"], 1e-9)
    ttft = fm["loads"][half]["ttft_p99_ms"] / max(st["loads"][half]["ttft_p99_ms"], 1e-9)
    kv = r["tasks"][n].get("kv", {}).get("utilization_mean", 0.0)
    return {
        "throughput_vs_static": {"value": thr, "goal": plans.GOAL_THROUGHPUT_VS_STATIC,
                                 "pass": thr >= plans.GOAL_THROUGHPUT_VS_STATIC},
        "ttft_p99_vs_static_at_50": {"value": ttft, "goal": plans.GOAL_TTFT_P99_VS_STATIC,
                                     "pass": ttft <= plans.GOAL_TTFT_P99_VS_STATIC},
        "lora_overhead": {"value": r["lora_overhead"]["overhead"], "goal": plans.GOAL_LORA_OVERHEAD,
                          "pass": r["lora_overhead"]["overhead"] <= plans.GOAL_LORA_OVERHEAD},
        "kv_utilization": {"value": kv, "goal": plans.GOAL_KV_UTILIZATION,
                           "pass": kv >= plans.GOAL_KV_UTILIZATION},
        "weight_shares": {"value": r["fairness"]["max_rel_error"], "goal": plans.GOAL_WEIGHT_SHARE,
                          "pass": r["fairness"]["max_rel_error"] <= plans.GOAL_WEIGHT_SHARE},
    }


def tables(r: dict, plan) -> None:
    lo = r["lora_overhead"]
    common.print_table(["step", "ms"], [
        ["base, 32 decode rows", lo["base_step_ms"]],
        [f"{lo['adapters']} adapters r{lo['rank']} x {lo['modules_per_layer']} modules", lo["lora_step_ms"]],
        ["LoRA math alone, segments (daemon)", lo["lora_math_segments_ms"]],
        ["LoRA math alone, gather form", lo["lora_math_gather_ms"]]],
        title=f"LoRA overhead: {lo['overhead']:.1%}")
    q = r["int8"]
    common.print_table(["dtype", "decode tok/s (batch 1)", "region MiB"], [
        ["float32", q["float32_tokens_per_s"], q["float32_region_mib"]],
        ["int8 (weight-only, per-channel)", q["int8_tokens_per_s"], q["int8_region_mib"]]],
        title=f"int8 vs float32: {q['speedup']:.2f}x decode speed, greedy steps agreeing "
              f"{q['greedy_agreement']:.1%} of {q['steps_compared']} (teacher-forced)")
    f = r["fairness"]
    common.print_table(["weight", "served tokens", "share", "want"],
                       [[w, v, s, x] for w, v, s, x in zip(f["weights"], f["served"].values(),
                                                           f["shares"], f["want"])],
                       title=f"Weighted shares under saturation ({f['window_s']:.0f} s)")
    if r["llamacpp"].get("rows"):
        common.print_table(r["llamacpp"]["header"], r["llamacpp"]["rows"],
                           title="llama.cpp (node-llama-cpp), base GGUF, reference")
    rows = []
    for n, t in r["tasks"].items():
        for name, s in t["systems"].items():
            sat = s["saturation"]
            rows.append([n, name, "saturation", sat["output_tokens_per_s"], sat["ttft_p50_ms"],
                         sat["ttft_p99_ms"], sat["tpot_p50_ms"], sat["tpot_p99_ms"], sat["failed"]])
            for f_, ld in s["loads"].items():
                rows.append([n, name, f"{float(f_):.0%} load", ld["output_tokens_per_s"],
                             ld["ttft_p50_ms"], ld["ttft_p99_ms"], ld["tpot_p50_ms"],
                             ld["tpot_p99_ms"], ld["failed"]])
        if "kv" in t:
            kv = t["kv"]
            print(f"\n[{n} tasks] fmplex KV: {kv.get('blocks_used_peak', 0)} of "
                  f"{kv.get('blocks_total', 0)} blocks at peak, tokens held / slots in use "
                  f"{kv.get('utilization_mean', 0):.1%} (min {kv.get('utilization_min', 0):.1%}), "
                  f"{kv.get('sequences_peak', 0)} sequences at peak")
    common.print_table(["goal", "value", "target", "result"],
                       [[k, g["value"], g["goal"], common.verdict(g["pass"])]
                        for k, g in r["goals"].items()], title="Goals")
    common.print_table(["tasks", "system", "phase", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
                        "TPOT p50 ms", "TPOT p99 ms", "failed"], rows,
                       title=f"Generation ({plan.threads} torch threads per system)")


if __name__ == "__main__":
    sys.exit(main())

"""Executor benchmark: one mixed batch of N tasks vs the same requests one task at a time.

    python -m bench.executor [--quick] [--out DIR]

The real embedded backbone (all-MiniLM-L6-v2, float32) and fmplexd.families.encoder.executor.Executor. Each task
has its own extension, written through a real slot (testkit.extensions.commit_extension) from random
tensors of the shapes ipc.slot_layout.tensor_specs gives; the kinds cycle through LoRA of several
ranks and targets, IA3, a prompt, linear / MLP / token heads and none (KINDS below). Each task sends
REQUESTS requests of 1-4 sequences of 8-64 tokens (fixed seed).

Per N (tasks): "mixed" is one Executor.run over every request of every task (interleaved as the
scheduler would take them); "one at a time" is the sum over tasks of one Executor.run over that
task's requests; the last column runs the mixed requests in batches of at most 4,096 tokens (the
daemon's token budget, which never lets one batch grow to N=32's ~12k tokens). Times are the median of several repeats after a warm-up; torch runs with the
thread count of one of the daemon's executor lanes (DaemonConfig.lanes_and_threads: cores //
lanes). Both ways must give the same outputs (checked).
"""
from __future__ import annotations

import statistics
import sys
import time

from bench import common
from fmplexd.config import DaemonConfig

import numpy as np
import torch

from fmplexd.families import load_backbone
from fmplexd.families.embedded import embedded_path
from fmplexd.families.encoder.forward import Encoder
from fmplexd.families.encoder.executor import Executor, WorkItem
from ipc.messages import (Activation, ExtensionSpec, HeadInput, HeadKind, HeadSpec,
                          Ia3Entry, LoraEntry, Output, Pooling)
from ipc.slot_layout import tensor_specs
from tasklets.adapters import Extension
from testkit.extensions import commit_extension

SEED = 0
REQUESTS = 4                    # per task
SEQS = (1, 4)                   # sequences per request
TOKENS = (8, 64)                # tokens per sequence
QV, QKVO = ("query", "value"), ("query", "key", "value", "attn_out")
FFN = ("ffn_in", "ffn_out")
TOKEN_BUDGET = 4096             # fmplexd.config.DaemonConfig.token_budget


def _lora(rank: int, modules, layers) -> list[LoraEntry]:
    return [LoraEntry(layer=l, module=m, rank=rank, scale=16.0 / rank) for l in layers for m in modules]


def kinds(layers: int) -> list[tuple[str, ExtensionSpec, Output]]:
    """(label, spec, output) of the extension kinds tasks cycle through."""
    every, half = range(layers), range(0, layers, 2)
    linear = HeadSpec(kind=HeadKind.LINEAR, input=HeadInput.POOLED, num_labels=3)
    return [
        ("lora r4 q,v", ExtensionSpec(pooling=Pooling.MEAN, lora=_lora(4, QV, every)), Output.POOLED),
        ("lora r16 q,k,v,o + head", ExtensionSpec(pooling=Pooling.CLS, lora=_lora(16, QKVO, half),
                                                  head=linear), Output.LOGITS),
        ("ia3 k,v,ffn_out", ExtensionSpec(pooling=Pooling.MEAN, ia3=[
            Ia3Entry(layer=l, module=m, feedforward=m == "ffn_out")
            for l in every for m in ("key", "value", "ffn_out")]), Output.POOLED),
        ("prompt 8", ExtensionSpec(pooling=Pooling.MEAN, prompt_tokens=8), Output.POOLED),
        ("mlp head", ExtensionSpec(pooling=Pooling.CLS, head=HeadSpec(
            kind=HeadKind.MLP, input=HeadInput.POOLED, num_labels=5, hidden=128,
            activation=Activation.GELU)), Output.LOGITS),
        ("lora r8 ffn", ExtensionSpec(pooling=Pooling.MEAN, lora=_lora(8, FFN, every)), Output.POOLED),
        ("token head", ExtensionSpec(pooling=Pooling.MEAN, head=HeadSpec(
            kind=HeadKind.LINEAR, input=HeadInput.TOKENS, num_labels=9)), Output.TOKEN_LOGITS),
        ("none", ExtensionSpec(pooling=Pooling.MEAN), Output.POOLED),
    ]


def random_tensors(spec: ExtensionSpec, info, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, _, shape in tensor_specs(spec, info):
        if name.startswith("ia3."):
            arr = 1.0 + rng.normal(0, 0.1, shape)
        elif name.startswith("lora.") and name.endswith(".A"):
            arr = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
        elif name.startswith("lora."):                         # B: non-zero, as after training
            arr = rng.normal(0, 0.02, shape)
        elif name == "prompt":
            arr = rng.normal(0, 0.5, shape)
        else:                                                   # heads
            arr = rng.normal(0, 0.05, shape)
        out[name] = arr.astype(np.float32)
    return out


def make_tasks(n: int, backbone, rng: np.random.Generator) -> list[tuple[str, list[WorkItem]]]:
    """n tasks, each (kind label, its REQUESTS work items)."""
    info, ks = backbone.info, kinds(backbone.config.layers)
    tasks = []
    for i in range(n):
        label, spec, output = ks[i % len(ks)]
        view = commit_extension(Extension(spec, random_tensors(spec, info, rng)), info, f"b{n}-{i}")
        items = []
        for _ in range(REQUESTS):
            lengths = [int(x) for x in rng.integers(TOKENS[0], TOKENS[1] + 1,
                                                    rng.integers(SEQS[0], SEQS[1] + 1))]
            ids = rng.integers(1000, info.vocab, sum(lengths)).astype(np.int32)
            items.append(WorkItem(view, output, ids, lengths))
        tasks.append((label, items))
    return tasks


def interleave(tasks) -> list[WorkItem]:
    """Every task's requests, round-robin over tasks (the order batch formation takes them)."""
    return [items[r] for r in range(REQUESTS) for _, items in tasks]


def budget_batches(items: list[WorkItem], budget: int = TOKEN_BUDGET) -> list[list[WorkItem]]:
    """The mixed requests cut, in order, into batches of at most `budget` tokens (as the daemon's
    scheduler would form them)."""
    out, cur, n = [], [], 0
    for it in items:
        if cur and n + len(it.ids) > budget:
            out.append(cur)
            cur, n = [], 0
        cur.append(it)
        n += len(it.ids)
    return out + [cur]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(ex: Executor, tasks, repeats: int) -> dict:
    mixed_items = interleave(tasks)
    chunks = budget_batches(mixed_items)
    ex.run(mixed_items)                                         # warm-up, every way
    for _, items in tasks:
        ex.run(items)
    mixed_t, alone_t, budget_t, mixed_out, alone_out = [], [], [], None, None
    for _ in range(repeats):
        t, mixed_out = timed(lambda: ex.run(mixed_items))
        mixed_t.append(t)
        budget_t.append(sum(timed(lambda: ex.run(c))[0] for c in chunks))
        total, alone_out = 0.0, []
        for _, items in tasks:
            t, out = timed(lambda: ex.run(items))
            total += t
            alone_out.append(out)
        alone_t.append(total)
    # Same outputs both ways (packing order changes float summation only).
    alone_by_item = {id(it): o for (_, items), outs in zip(tasks, alone_out)
                     for it, o in zip(items, outs)}
    diff = max(float(np.abs(o - alone_by_item[id(it)]).max())
               for it, o in zip(mixed_items, mixed_out))
    tokens = sum(len(it.ids) for it in mixed_items)
    rows = sum(len(it.ids) + it.view.prompt_tokens * len(it.lengths) for it in mixed_items)
    mixed, alone, budget = (statistics.median(x) for x in (mixed_t, alone_t, budget_t))
    return {"tasks": len(tasks), "requests": len(mixed_items),
            "sequences": sum(len(it.lengths) for it in mixed_items), "tokens": tokens,
            "rows_with_virtual": rows, "kinds": sorted({label for label, _ in tasks}),
            "mixed_s": mixed, "one_at_a_time_s": alone,
            "mixed_tok_s": tokens / mixed, "one_at_a_time_tok_s": tokens / alone,
            "speedup": alone / mixed, "mixed_runs_s": mixed_t, "one_at_a_time_runs_s": alone_t,
            "budget_batches": len(chunks), "budget_batches_s": budget,
            "budget_batches_speedup": alone / budget, "budget_batches_runs_s": budget_t,
            "speedup_of_min": min(alone_t) / min(mixed_t), "max_abs_diff": diff}


def main() -> int:
    args = common.parser(__doc__).parse_args()
    out = common.out_dir(args.out, "executor")
    threads = DaemonConfig().lanes_and_threads()[1]           # one lane's, as fmplexd sets it
    torch.set_num_threads(threads)
    ns, repeats = ((1, 8), 1) if args.quick else ((1, 8, 32), 5)
    t_load = time.perf_counter()
    backbone = load_backbone("default", embedded_path("minilm"))
    load_s = time.perf_counter() - t_load
    ex = Executor(Encoder(backbone.config, backbone.weights))
    rng = np.random.default_rng(SEED)
    results = []
    for n in ns:
        r = measure(ex, make_tasks(n, backbone, rng), repeats)
        print(f"N={n}: {r['tokens']} tokens, mixed {r['mixed_s'] * 1e3:.0f} ms, one at a time "
              f"{r['one_at_a_time_s'] * 1e3:.0f} ms (max |diff| {r['max_abs_diff']:.1e})",
              file=sys.stderr, flush=True)
        if r["max_abs_diff"] > 1e-3:
            raise AssertionError(f"N={n}: mixed and one-at-a-time outputs differ by "
                                 f"{r['max_abs_diff']}")
        results.append(r)
    common.write_json(out, "executor.json", {
        "backbone": "all-MiniLM-L6-v2 (embedded, float32)", "torch_threads": threads,
        "torch": torch.__version__, "repeats": repeats, "quick": args.quick, "seed": SEED,
        "requests_per_task": REQUESTS, "sequences_per_request": list(SEQS),
        "tokens_per_sequence": list(TOKENS), "backbone_load_s": load_s,
        "kinds": [k for k, _, _ in kinds(backbone.config.layers)], "results": results})
    m = common.machine()
    rows = [[r["tasks"], r["requests"], r["tokens"], f"{r['mixed_s'] * 1e3:.1f}",
             f"{r['one_at_a_time_s'] * 1e3:.1f}", f"{r['mixed_tok_s']:.0f}",
             f"{r['one_at_a_time_tok_s']:.0f}", f"{r['speedup']:.2f}x",
             f"{r['budget_batches']} / {r['budget_batches_s'] * 1e3:.1f} / "
             f"{r['budget_batches_speedup']:.2f}x"] for r in results]
    common.print_table(["N tasks", "requests", "tokens", "mixed ms", "one-at-a-time ms",
                        "mixed tok/s", "one-at-a-time tok/s", "speed-up",
                        f"<= {TOKEN_BUDGET}-token batches: n / ms / speed-up"], rows,
                       title=f"executor: one mixed batch vs one task at a time (torch threads "
                             f"{threads}, median of {repeats}, load {m['loadavg_1m']} on "
                             f"{m['cpus']} cpus)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

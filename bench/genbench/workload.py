"""The generation workload: tasks of zipf popularity (bench/workload.py's shares), Poisson arrivals,
prompt lengths uniform in [32, 256] tokens and output lengths uniform in [16, 128] (end-of-sequence
ignored, so every request generates exactly its drawn length). Prompts are words of bench/workload's
list; `ids` is their tokenization by the backbone's tokenizer, which every system receives (fmplex
as text, which its task tokenizes to the same ids)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.workload import WORDS, WorkloadSpec, arrival_times


@dataclass(frozen=True, slots=True)
class GenRequest:
    t: float                 # arrival, seconds from the start (0 for closed-loop runs)
    task: int
    text: str
    ids: tuple[int, ...]
    max_tokens: int


def requests(tokenizer, n_tasks: int, rate: float | None, duration_s: float, n: int | None,
             seed: int, alpha: float = 0.9, prompt=(32, 256), output=(16, 128)) -> list[GenRequest]:
    """Poisson arrivals at `rate` for `duration_s`, or (rate None) `n` requests all at t = 0."""
    rng = np.random.default_rng(seed)
    spec = WorkloadSpec(n_tasks=n_tasks, alpha=alpha, total_rate=rate or 1.0,
                        duration_s=duration_s, seed=seed)
    times = arrival_times(rng, rate, duration_s) if rate else np.zeros(n)
    tasks = rng.choice(n_tasks, size=len(times), p=spec.shares())
    out = []
    for t, k in zip(times, tasks):
        words = int(rng.integers(prompt[0], prompt[1] + 1))
        text = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))
        ids = tuple(tokenizer.encode(text, add_special_tokens=False).ids)
        out.append(GenRequest(float(t), int(k), text, ids,
                              int(rng.integers(output[0], output[1] + 1))))
    return out

"""What the two transformers baselines share: loading the model, timing each generated token, and
driving requests into a server process at their arrival times."""
from __future__ import annotations

import threading
import time
from typing import Callable

from bench.genbench.records import Record
from bench.genbench.workload import GenRequest


def load_model(backbone_dir: str, gguf_file: str | None):
    import torch
    import transformers
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return transformers.AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.float32,
                                                             **kw).eval()


def step_timer():
    """A transformers LogitsProcessor that records when each generation step's logits were ready
    (`.times[k]`: the (k+1)-th token)."""
    from transformers import LogitsProcessor

    class Steps(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.monotonic())
            return scores
    return Steps()


def drive(requests: list[GenRequest], send: Callable[[int, GenRequest], None], outbox
          ) -> tuple[list[Record], float]:
    """Send each request at its arrival time (a feeder thread) and collect the ("done", (index,
    first token, last token, tokens)) answers a server process puts on `outbox`."""
    records = [Record(r.task, 0.0, prompt_tokens=len(r.ids)) for r in requests]
    t0 = time.monotonic()

    def feed():
        for i, r in enumerate(requests):
            time.sleep(max(0.0, t0 + r.t - time.monotonic()))
            records[i].sent = time.monotonic()
            send(i, r)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    for _ in requests:
        _, (i, first, end, n) = outbox.get(timeout=3600)
        records[i].first, records[i].end, records[i].tokens = first, end, n
    feeder.join()
    return records, time.monotonic() - t0

"""Static batching with transformers + PEFT, as a user would write it: one process holds the model
with every task's adapter loaded (PeftModel.load_adapter), takes up to `batch` queued requests
whenever it is idle, left-pads their prompts and runs one `generate(..., adapter_names=[...])` to
the longest requested length (end-of-sequence ignored); a request's tokens are ready when the batch
returns, and its k-th token was computed at step k (timed by a logits processor)."""
from __future__ import annotations

import multiprocessing as mp
import queue
import time

from bench.genbench.hf_common import drive, load_model, step_timer
from bench.genbench.records import Record
from bench.genbench.workload import GenRequest


def _server(backbone_dir, gguf_file, adapters, threads, batch, inbox, outbox) -> None:
    import os
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from peft import PeftModel
    from transformers import LogitsProcessorList
    torch.set_num_threads(threads)
    model = load_model(backbone_dir, gguf_file)
    names = [f"a{i}" if a else None for i, a in enumerate(adapters)]
    peft_model = None
    for name, path in zip(names, adapters):
        if path is None:
            continue
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            peft_model.load_adapter(path, adapter_name=name)
    model = (peft_model or model).eval()
    outbox.put(("ready", None))
    while True:
        first = inbox.get()
        if first is None:
            return
        reqs = [first]
        while len(reqs) < batch:
            try:
                item = inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                inbox.put(None)
                break
            reqs.append(item)
        width = max(len(r[1]) for r in reqs)
        ids = torch.tensor([[0] * (width - len(r[1])) + list(r[1]) for r in reqs])
        mask = torch.tensor([[0] * (width - len(r[1])) + [1] * len(r[1]) for r in reqs])
        steps = step_timer()
        kw = {}
        if peft_model is not None:
            kw["adapter_names"] = [names[r[3]] or "__base__" for r in reqs]
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r[2] for r in reqs),
                           do_sample=False, eos_token_id=None, pad_token_id=0,
                           logits_processor=LogitsProcessorList([steps]), **kw)
        done = time.monotonic()
        for idx, _, n, _ in reqs:
            outbox.put(("done", (idx, steps.times[0], steps.times[n - 1] if n <= len(steps.times)
                                 else done, n)))


class HfStatic:
    name = "static batching (transformers + PEFT)"

    def __init__(self, backbone_dir: str, gguf_file: str | None, adapters: list[str | None],
                 threads: int, batch: int):
        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_server, args=(backbone_dir, gguf_file, adapters, threads,
                                                      batch, self.inbox, self.outbox), daemon=True)

    def start(self) -> "HfStatic":
        self.proc.start()
        kind, _ = self.outbox.get(timeout=600)
        assert kind == "ready"
        return self

    def run(self, requests: list[GenRequest]) -> tuple[list[Record], float]:
        return drive(requests, lambda i, r: self.inbox.put((i, r.ids, r.max_tokens, r.task)),
                     self.outbox)

    def close(self) -> None:
        if self.proc.is_alive():
            self.inbox.put(None)
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

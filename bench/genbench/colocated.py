"""Co-location: one transformers process per task, its LoRA merged into its own copy of the
weights, each serving its task's requests one at a time (greedy, end-of-sequence ignored, the k-th
token timed by a logits processor). Every process gets one torch thread."""
from __future__ import annotations

import multiprocessing as mp

from bench.genbench.hf_common import drive, load_model, step_timer
from bench.genbench.records import Record
from bench.genbench.workload import GenRequest


def _server(backbone_dir, gguf_file, adapter, inbox, outbox) -> None:
    import os
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import LogitsProcessorList
    torch.set_num_threads(1)
    model = load_model(backbone_dir, gguf_file)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    outbox.put(("ready", os.getpid()))
    while True:
        item = inbox.get()
        if item is None:
            return
        idx, ids, n = item
        steps = step_timer()
        with torch.no_grad():
            model.generate(input_ids=torch.tensor([list(ids)]), attention_mask=torch.ones(1, len(ids),
                                                                                          dtype=torch.long),
                           max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                           logits_processor=LogitsProcessorList([steps]))
        outbox.put(("done", (idx, steps.times[0], steps.times[-1], n)))


class Colocated:
    name = "co-located (a transformers process per task)"

    def __init__(self, backbone_dir: str, gguf_file: str | None, adapters: list[str | None]):
        ctx = mp.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in adapters]
        self.procs = [ctx.Process(target=_server, args=(backbone_dir, gguf_file, a, q, self.outbox),
                                  daemon=True) for a, q in zip(adapters, self.inboxes)]
        self.pids: list[int] = []

    def start(self) -> "Colocated":
        for p in self.procs:                  # one at a time: loading is memory-heavy
            p.start()
            kind, pid = self.outbox.get(timeout=900)
            assert kind == "ready"
            self.pids.append(pid)
        return self

    def run(self, requests: list[GenRequest]) -> tuple[list[Record], float]:
        return drive(requests, lambda i, r: self.inboxes[r.task].put((i, r.ids, r.max_tokens)),
                     self.outbox)

    def close(self) -> None:
        for q in self.inboxes:
            q.put(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()

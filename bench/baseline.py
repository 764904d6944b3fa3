"""One task served as its own model instance: the baselines of bench/serve.py.

    python -m bench.baseline --spec SPEC.toml --endpoint ipc://PATH [--threads N] [--cpus 0,1]
                             [--cgroup DIR] [--time-slice I/N/MS] [--device cpu|cuda]

The process reads the task's spec (the same TOML, adapter directory and head file an fmplex task
uses), loads its *own private copy* of the backbone (fmplexd.families.encoder.loader.read_weights: plain tensors,
nothing shared), merges the task's LoRA into it (W += scale * B @ A for every adapted module) and
keeps the task's head. It serves the fmplex client protocol (Infer -> InferReply, MessagePack on a
ZeroMQ ROUTER), so the load driver speaks to every system with the same messages and codec.

Forward: fmplexd's own Encoder over the merged weights (same kernels as the daemon, so a difference
measured between the systems is a difference of the serving design, not of the model code); the
same tokenizer and post-processing as a task process (tasklets.pipelines.text.TextPipeline).

Batching: its own dynamic batching with no waiting. The loop blocks for a request, then takes every
request already waiting (up to --max-batch requests / --max-batch-tokens tokens) into one packed
forward, answers them all, repeats. At the per-task rates of a shared machine this is mostly
batch 1; a popular task gets small batches when requests queue up behind a forward.

Placement (set by bench/serve.py): --cpus pins the process (os.sched_setaffinity, before torch is
imported so its OpenMP pool inherits the mask), --threads sets torch's intra-op threads (0 = torch's
default), --cgroup joins a cgroup-v1 `cpu` group whose CFS quota caps its CPU time, --time-slice
I/N/MS lets it start a forward only during its own MS-millisecond slot of N (an equal time slice,
used on a GPU without MPS). Prints `ready PID` on stdout once it serves.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _place(args) -> None:
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if args.mps_percent:
        os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(args.mps_percent)


class MergedModel:
    """A private backbone copy with one task's LoRA merged in, plus its pooling and head."""

    def __init__(self, backbone_dir: str, spec, device: str = "cpu"):
        import torch
        from fmplexd.families.encoder.loader import TARGETS, read_config, read_weights, targets
        from fmplexd.families.encoder.forward import Encoder
        from ipc.messages import HeadInput, HeadKind
        from tasklets.adapters import build_extension
        from types import SimpleNamespace
        from tasklets.pipelines.text import TextPipeline
        self.torch, self.device = torch, torch.device(device)
        cfg = read_config(backbone_dir)
        # This process's own copy: safetensors maps the file, and clean file pages would be
        # shared through the page cache by every instance; an instance holds private weights.
        weights = {k: v.clone() for k, v in read_weights(backbone_dir).items()}
        ext = build_extension(targets(cfg), spec.adapter, spec.head, spec.pooling, HeadInput.POOLED,
                              spec.head_activation)
        if ext.spec.ia3 or ext.spec.prompt_tokens:
            raise ValueError("the baseline merges LoRA only (no IA3 or prompt tuning)")
        for e in ext.spec.lora:                                    # W += scale * B @ A
            name = f"encoder.layer.{e.layer}.{TARGETS[e.module]}.weight"
            A = torch.from_numpy(ext.tensors[f"lora.{e.layer}.{e.module}.A"])
            B = torch.from_numpy(ext.tensors[f"lora.{e.layer}.{e.module}.B"])
            weights[name] = weights[name] + e.scale * (B @ A)
        self.encoder = Encoder(cfg, {k: v.to(self.device) for k, v in weights.items()})
        del weights
        head = {k[5:]: torch.from_numpy(v).to(self.device) for k, v in ext.tensors.items()
                if k.startswith("head.")}
        self.head, self.head_kind = head, ext.spec.head.kind if ext.spec.head else None
        self.mlp = self.head_kind is HeadKind.MLP
        self.activation = spec.head_activation.value
        self.mean = spec.pooling.value == "mean"
        tokenizer = os.path.join(backbone_dir, "tokenizer.json")
        self.pipeline = TextPipeline(spec, SimpleNamespace(tokenizer=tokenizer,
                                                           max_positions=cfg.max_positions))
        self.offset = cfg.position_offset

    def run(self, ids_list: list, lengths: list[int]):
        """(S, L) head outputs (or (S, H) pooled rows) for the sequences, packed without padding."""
        import numpy as np
        import torch.nn.functional as F
        from fmplexd.families.encoder.forward import PackedInput
        from kernels.attention import Bucket, VarlenPlan, plan_varlen
        from kernels.heads import ACTIVATIONS
        torch, dev = self.torch, self.device
        lens = np.asarray(lengths, np.int64)
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        ids = torch.from_numpy(np.concatenate(ids_list).astype(np.int64))
        pos = torch.from_numpy(np.arange(int(lens.sum())) - np.repeat(starts, lens) + self.offset)
        plan = plan_varlen(starts.tolist(), lens.tolist())
        if dev.type != "cpu":
            plan = VarlenPlan(plan.total, [Bucket(b.index.to(dev), None if b.mask is None else
                                                  b.mask.to(dev), b.valid.to(dev), b.rows.to(dev))
                                           for b in plan.buckets])
        with torch.inference_mode():
            batch = PackedInput(ids=ids.to(dev), type_ids=torch.zeros_like(ids).to(dev),
                                positions=pos.to(dev), plan=plan)
            hidden = self.encoder.forward(batch)                              # (T, H)
            seg = torch.repeat_interleave(torch.arange(len(lens), device=dev),
                                          torch.from_numpy(lens).to(dev))
            if self.mean:
                pooled = torch.zeros(len(lens), hidden.shape[1], device=dev).index_add_(0, seg, hidden)
                pooled /= torch.from_numpy(lens).to(dev, hidden.dtype)[:, None]
            else:
                pooled = hidden[torch.from_numpy(starts).to(dev)]
            if not self.head:
                return pooled.float().cpu().numpy()
            out = F.linear(pooled, self.head["w1" if self.mlp else "weight"],
                           self.head["b1" if self.mlp else "bias"])
            if self.mlp:
                out = F.linear(ACTIVATIONS[self.activation](out), self.head["w2"], self.head["b2"])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return out.float().cpu().numpy()


def _wait_for_slot(slot: tuple[int, int, float] | None) -> None:
    """Equal time slices: start only inside this process's slot (index, count, slot seconds)."""
    if slot is None:
        return
    index, count, length = slot
    now = time.time()
    phase = now % (count * length)
    start = index * length
    if not start <= phase < start + length:
        time.sleep((start - phase) % (count * length))


def serve(args) -> None:
    import zmq

    from ipc import codec, transport
    from ipc.errors import FmplexError, ProtocolError
    from ipc.messages import Error, Infer
    from ipc.spec import load_spec
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    model = MergedModel(args.backbone, spec, args.device)
    warm = model.pipeline.encode(["warm up the model"])
    model.run([warm.ids], warm.lengths)
    slot = None
    if args.time_slice:
        i, n, ms = args.time_slice.split("/")
        slot = (int(i), int(n), float(ms) / 1e3)
    ctx = zmq.Context()
    sock = transport.router(ctx, args.endpoint, max_msg_bytes=64 << 20)
    print(f"ready {os.getpid()}", flush=True)
    while True:
        taken = [transport.recv_sync(sock, router_side=True)]
        while len(taken) < args.max_batch and sock.poll(0):
            taken.append(transport.recv_sync(sock, router_side=True))
        work, tokens = [], 0                    # (identity, msg, encoded)
        for env in taken:
            try:
                msg = env.decode(frozenset({Infer}))
                enc = model.pipeline.encode(msg.texts, msg.pairs)
                if work and tokens + len(enc.ids) > args.max_batch_tokens:
                    _run(model, work, sock, slot, spec)
                    work, tokens = [], 0
                work.append((env.identity, msg, enc))
                tokens += len(enc.ids)
            except (ProtocolError, FmplexError) as e:
                transport.send(sock, Error(codec.peek_ref(env.frames), e.code, e.message),
                               env.identity)
        if work:
            _run(model, work, sock, slot, spec)


def _run(model: MergedModel, work: list, sock, slot, spec) -> None:
    from ipc import transport
    _wait_for_slot(slot)
    out = model.run([i for _, _, e in work for i in _split(e)], [n for _, _, e in work for n in e.lengths])
    row = 0
    for identity, msg, enc in work:
        n = len(enc.lengths)
        reply = model.pipeline.reply(msg.ref, spec.name, 1, enc, out[row:row + n],
                                     msg.top_k or spec.top_k)
        row += n
        try:
            transport.send(sock, reply, identity)
        except transport.PeerGone:
            pass                                 # the client went away; nothing to answer


def _split(enc):
    """Per-sequence id arrays of an Encoded."""
    import numpy as np
    return np.split(enc.ids, np.cumsum(enc.lengths)[:-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--backbone", default="embedded")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = default")
    ap.add_argument("--cpus", default="", help="pin to these cores, e.g. 0,1")
    ap.add_argument("--cgroup", default="", help="join this cgroup-v1 cpu group (CFS quota)")
    ap.add_argument("--time-slice", default="", help="I/N/MS: forward only in slot I of N")
    ap.add_argument("--mps-percent", type=int, default=0, help="CUDA MPS active thread percentage")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    _place(args)
    if args.backbone == "embedded":
        from fmplexd.families.embedded import embedded_path
        args.backbone = embedded_path("minilm")
    try:
        serve(args)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

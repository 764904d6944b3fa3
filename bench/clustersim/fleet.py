"""Fleets, backbones and their costs for the cluster simulator, each figure with its source.

Measured in this project (docs/benchmarks.md, `python -m bench.serve`: all-MiniLM-L6-v2 on a
2-core CPU like this machine's, one torch thread for the forward):
  CPU_FIXED_S + CPU_PER_TOKEN_S x tokens   batch-1 latency of a dedicated instance by input
                                 length (4 tok 10.66 ms, 24 tok 12.93 ms, 128 tok 24.71 ms): the
                                 line through them (10.21 ms + 0.1133 ms per token)
  CPU_TOKENS_PER_S = 3340        fmplexd's measured forward rate (tokens/s) at start, MiniLM
  LORA_SHARE = 0.33              the LoRA segments' share of fmplex's batched forward (profile);
                                 a dedicated instance merges its LoRA and pays none of it
  FMPLEX_TASK_BYTES = 12 MiB     memory each further task costs fmplex on a host
  FMPLEX_DAEMON_BYTES = 210 MiB  the daemon without its backbone copy (300 MiB fixed - 91 MB)
  INSTANCE_RUNTIME_CPU = 191 MiB one instance per task without its weights (282 MiB - 91 MB)
Public figures: parameter counts, layers and hidden sizes of the released checkpoints (below).
Scaled from the measurement: another encoder's per-token cost by its parameter count (FLOPs per
token are about 2 x parameters), its fixed cost by its depth.
Assumed, not measured (this project has no GPU): an A100-80GB-class device doing 312 TFLOP/s in
fp16 at 40% utilization and reading 2.0 TB/s of HBM at 70%; 0.15 ms of fixed cost per layer
(kernel launches); a CUDA process's own memory 0.5 GiB; a decoder request of 128 prompt and 64
generated tokens; KV pools of 32 concurrent sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

MiB, GiB = 1 << 20, 1 << 30

CPU_FIXED_S, CPU_PER_TOKEN_S = 10.21e-3, 0.1133e-3       # measured (MiniLM, 1 thread)
CPU_TOKENS_PER_S = 3340.0
MINILM_PARAMS, MINILM_LAYERS = 22.7e6, 6
LORA_SHARE = 0.33
FMPLEX_TASK_BYTES = 12 * MiB
FMPLEX_DAEMON_BYTES = 210 * MiB
INSTANCE_RUNTIME_CPU = 191 * MiB

GPU_FLOPS = 312e12 * 0.40                                # assumed
GPU_HBM = 2.0e12 * 0.70                                  # assumed
GPU_FIXED_PER_LAYER_S = 0.15e-3                          # assumed
INSTANCE_RUNTIME_GPU = GiB // 2                          # assumed (CUDA context, allocator)
FMPLEX_DAEMON_GPU = GiB                                  # assumed (the daemon's own, once)
PROMPT, GENERATED, KV_SEQUENCES = 128, 64, 32            # assumed (decoder requests)
CPU_FLOPS = 2 * MINILM_PARAMS * CPU_TOKENS_PER_S         # what the measurement implies


@dataclass(frozen=True, slots=True)
class Backbone:
    name: str
    kind: str                    # encoder | decoder
    params: float
    layers: int
    hidden: int
    tokens: float                # mean input tokens of a request (encoders), prompt (decoders)
    lognormal: bool = False      # text lengths vary (lognormal, median `tokens`, sigma 0.6)

    def weight_bytes(self, gpu: bool) -> int:
        return int(self.params * (2 if gpu else 4))

    def kv_bytes(self) -> int:
        """A KV pool of KV_SEQUENCES sequences of PROMPT + GENERATED tokens (decoders, fp16)."""
        if self.kind != "decoder":
            return 0
        return 2 * self.layers * self.hidden * 2 * (PROMPT + GENERATED) * KV_SEQUENCES

    def copy_bytes(self, gpu: bool) -> int:
        """A loaded copy: weights and (decoders) its KV pool."""
        return self.weight_bytes(gpu) + self.kv_bytes()

    def lora_bytes(self, gpu: bool, rank: int = 8) -> int:
        """A task's extension: LoRA of rank 8 on q, k, v, o of every layer, plus a small head."""
        return self.layers * 4 * 2 * self.hidden * rank * (2 if gpu else 4) + 64 * 1024

    def cost(self, gpu: bool) -> tuple[float, float]:
        """(fixed s, s per token) of one batch: time = fixed + per_token x tokens in it.
        A decoder's batch generates GENERATED tokens for each of its sequences: the memory-bound
        steps are the fixed part, each sequence's prefill and decode compute its tokens' part."""
        if not gpu:
            return (CPU_FIXED_S * self.layers / MINILM_LAYERS,
                    CPU_PER_TOKEN_S * self.params / MINILM_PARAMS)
        flop_s = 2 * self.params / GPU_FLOPS             # one token's compute
        if self.kind == "decoder":
            step = self.weight_bytes(True) / GPU_HBM
            return GENERATED * step, flop_s * (1 + GENERATED / PROMPT)
        return GPU_FIXED_PER_LAYER_S * self.layers, flop_s

    def iteration(self) -> tuple[float, float]:
        """A decoder on the GPU: (s per iteration, s per token in it): each iteration reads the
        weights once and computes one token of every running sequence (and new prompts)."""
        return self.weight_bytes(True) / GPU_HBM, 2 * self.params / GPU_FLOPS

    def chunk_s(self, gpu: bool, batch: float) -> float:
        """The longest it holds the device without yielding: a decoder one iteration of a full
        KV pool, an encoder one batch of `batch` requests."""
        if self.kind == "decoder" and gpu:
            step, per_token = self.iteration()
            return step + per_token * KV_SEQUENCES
        fixed, per_token = self.cost(gpu)
        return fixed + per_token * self.tokens * batch

    def batch1_s(self, gpu: bool) -> float:
        fixed, per_token = self.cost(gpu)
        return fixed + per_token * self.tokens

    def instance_bytes(self, gpu: bool) -> int:
        """One model instance per task: runtime, a private copy (LoRA merged), its KV pool."""
        return (INSTANCE_RUNTIME_GPU if gpu else INSTANCE_RUNTIME_CPU) + self.copy_bytes(gpu)


BACKBONES = {b.name: b for b in (
    Backbone("minilm", "encoder", 22.7e6, 6, 384, 20, lognormal=True),       # all-MiniLM-L6-v2
    Backbone("bert-base", "encoder", 110e6, 12, 768, 20, lognormal=True),    # bert-base-uncased
    Backbone("dinov2-small", "encoder", 22.1e6, 12, 384, 257),               # ViT-S/14, 224 px
    Backbone("dinov2-base", "encoder", 86.6e6, 12, 768, 257),                # ViT-B/14, 224 px
    Backbone("chronos-small", "encoder", 47.7e6, 12, 512, 64),               # chronos-bolt-small
    Backbone("chronos-base", "encoder", 205e6, 24, 768, 64),                 # chronos-bolt-base
    Backbone("smollm2-1.7b", "decoder", 1.71e9, 24, 2048, PROMPT),           # SmolLM2-1.7B
    Backbone("llama-7b", "decoder", 6.74e9, 32, 4096, PROMPT),               # Llama-2-7B class
)}


@dataclass(frozen=True, slots=True)
class Fleet:
    name: str
    gpu: bool
    devices: int
    device_bytes: int            # memory of one device (GPU) or host (CPU) for serving
    mix: tuple[tuple[str, float], ...]   # (backbone, share of the tasks)
    top_rate: float              # requests/s of the most popular task (zipf, alpha 0.9)
    min_rate: float = 0.05       # every task gets at least this much traffic
    max_batch_tokens: int = 8192

    def backbones(self) -> list[Backbone]:
        return [BACKBONES[n] for n, _ in self.mix]

    def daemon_bytes(self) -> int:
        return FMPLEX_DAEMON_GPU if self.gpu else FMPLEX_DAEMON_BYTES

    def task_bytes(self, b: Backbone) -> int:
        """What one more task costs fmplex on a device: its slot (and, on a CPU host, where the
        task process lives too, that process)."""
        return b.lora_bytes(self.gpu) + (0 if self.gpu else FMPLEX_TASK_BYTES)

    def batch_limit(self, b: Backbone) -> int:
        """Tokens per batch: a decoder's KV pool holds KV_SEQUENCES sequences; on the CPU the
        daemon sizes batches to about 50 ms of forward (batch_target_ms)."""
        if b.kind == "decoder":
            return int(KV_SEQUENCES * b.tokens)
        if not self.gpu:
            return max(int(b.tokens), int(0.05 / b.cost(False)[1]))
        return self.max_batch_tokens


FLEETS = {
    "gpu": Fleet("gpu", True, 16, 80 * GiB,
                 (("minilm", 0.25), ("bert-base", 0.20), ("dinov2-base", 0.15),
                  ("chronos-base", 0.10), ("smollm2-1.7b", 0.15), ("llama-7b", 0.15)),
                 top_rate=40.0),
    "cpu": Fleet("cpu", False, 16, 24 * GiB,
                 (("minilm", 0.40), ("bert-base", 0.25), ("dinov2-small", 0.20),
                  ("chronos-small", 0.15)),
                 top_rate=8.0, min_rate=0.02),
}

"""The kernel test grid shared by CPU and CUDA kernel tests: dtypes x ranks x adapter
distributions x odd batch sizes, and outputs poisoned before each run so that elements a kernel
fails to write are caught. Each fixed kernel bug adds a case to CASES."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kernels.lora import LoraSegment, lora_loop_reference

DTYPES = {"fp32": (torch.float32, 1e-5), "fp16": (torch.float16, 2e-3), "bf16": (torch.bfloat16, 2e-2)}
RANKS = (4, 8, 16, 32, 64)
DISTRIBUTIONS = ("distinct", "uniform", "zipf", "identical", "skewed")
BATCH_SIZES = (1, 7, 33, 129)


@dataclass(frozen=True)
class Case:
    dtype: str
    rank: int
    distribution: str
    rows: int
    n_adapters: int = 8
    fan_in: int = 64
    fan_out: int = 96


CASES = [Case(d, r, dist, n) for d in DTYPES for r in (4, 64) for dist in DISTRIBUTIONS
         for n in (7, 129)] + [Case("fp32", r, "uniform", 33) for r in RANKS]


def assign(case: Case, rng: np.random.Generator) -> np.ndarray:
    """Adapter index per row, sorted (rows sharing an adapter are contiguous, as the executor
    packs them)."""
    n, k = case.rows, case.n_adapters
    if case.distribution == "distinct":
        idx = np.arange(n) % max(n, 1)
    elif case.distribution == "uniform":
        idx = rng.integers(0, k, n)
    elif case.distribution == "zipf":
        p = 1.0 / np.arange(1, k + 1)
        idx = rng.choice(k, n, p=p / p.sum())
    elif case.distribution == "identical":
        idx = np.zeros(n, int)
    else:                                        # one adapter takes ~90%, the rest share the tail
        idx = np.where(rng.random(n) < 0.9, 0, rng.integers(1, k, n))
    return np.sort(idx)


def adapters(case: Case, n_adapters: int, gen: torch.Generator):
    """Per adapter: rank (varying around the case's rank), A (r, in), B (out, r), scale."""
    out = []
    for a in range(n_adapters):
        r = max(1, case.rank - (a % 3) * case.rank // 4)
        A = torch.randn(r, case.fan_in, generator=gen) / math.sqrt(case.fan_in)
        B = torch.randn(case.fan_out, r, generator=gen) / math.sqrt(r)
        out.append((r, A, B, 0.5 + a / n_adapters))
    return out


def segments(idx: np.ndarray, ads, dtype) -> list[LoraSegment]:
    segs, start = [], 0
    for a in np.unique(idx):
        end = start + int((idx == a).sum())
        r, A, B, scale = ads[a]
        segs.append(LoraSegment(start, end, A.to(dtype), B.to(dtype), scale))
        start = end
    return segs


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def case_id(case: Case) -> str:
    return f"{case.dtype}-r{case.rank}-{case.distribution}-n{case.rows}"


@dataclass
class LoraProblem:
    """One case's inputs (rows sorted by adapter `idx`; adapters `ads` as (rank, A, B, scale)) and
    its fp64 reference: want = y0 + the loop over segments. `gen` draws anything a test adds."""
    idx: np.ndarray
    ads: list
    x: torch.Tensor
    y0: torch.Tensor
    want: torch.Tensor
    gen: torch.Generator

    def segments(self, dtype) -> list[LoraSegment]:
        return segments(self.idx, self.ads, dtype)


def lora_problem(case: Case, seed: int = 0) -> LoraProblem:
    """The inputs of a case, reproducible from (case, seed)."""
    rng, gen = np.random.default_rng(case.rank + seed), torch.Generator().manual_seed(case.rows + seed)
    idx = assign(case, rng)
    ads = adapters(case, int(idx.max()) + 1, gen)
    x = torch.randn(case.rows, case.fan_in, generator=gen)
    y0 = torch.randn(case.rows, case.fan_out, generator=gen)
    want = lora_loop_reference(y0.double(), x.double(), segments(idx, ads, torch.float64))
    return LoraProblem(idx, ads, x, y0, want, gen)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Within tol relative to the reference's largest magnitude (at least 1)."""
    assert (got.double() - want).abs().max() <= tol * max(1.0, want.abs().max().item())

"""One record per generation request and the statistics the benchmark reports."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(slots=True)
class Record:
    task: int
    sent: float                   # monotonic seconds
    first: float = 0.0            # the first generated token reached the client
    end: float = 0.0              # the last one did
    tokens: int = 0               # generated
    prompt_tokens: int = 0
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def tpot(self) -> float:
        return (self.end - self.first) / (self.tokens - 1) if self.tokens > 1 else 0.0


def summarize(records: list[Record], wall_s: float) -> dict:
    ok = [r for r in records if not r.error and r.tokens > 0]
    ms = lambda xs, q: float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else 0.0  # noqa: E731
    ttft, tpot = [r.ttft for r in ok], [r.tpot for r in ok if r.tokens > 1]
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
            "errors": sorted({r.error for r in records if r.error})[:5],
            "output_tokens": tokens, "wall_s": wall_s,
            "output_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "tpot_p50_ms": ms(tpot, 50), "tpot_p99_ms": ms(tpot, 99)}


def as_dicts(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]

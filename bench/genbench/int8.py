"""The decoder's int8 dtype against float32, in-process on the daemon's own forward: decode speed
at batch 1 (one sequence, greedy, each step timed) and how often int8 picks float32's greedy token.

Agreement is teacher-forced: float32 decodes greedily; int8 is fed float32's tokens and, at every
step, its argmax is compared with float32's, so one early disagreement does not spoil the rest.
Both backbones are loaded from the same file (kernels.int8 quantizes at load)."""
from __future__ import annotations

import statistics

from fmplexd.families.decoder.forward import DecoderForward
from testkit.decode import greedy_decode


def int8_vs_float32(path: str, prompts: list[list[int]], steps: int, workdir: str) -> dict:
    """Decode tokens/s at batch 1 of both dtypes (median step over all prompts) and the share of
    teacher-forced greedy steps where int8's token equals float32's."""
    from fmplexd.families import load_backbone
    runs = {}
    for dtype in ("float32", "int8"):
        bb = load_backbone(f"bench-{dtype}", path, dtype, workdir)
        fw = DecoderForward(bb.config, bb.weights)
        greedy_decode(fw, bb.config, prompts[0], 3)                               # warm
        runs[dtype] = (fw, bb)
    fw32, bb32 = runs["float32"]
    fw8, bb8 = runs["int8"]
    agree = total = 0
    t32: list[float] = []
    t8: list[float] = []
    for prompt in prompts:                        # interleaved: both see the same machine speed
        ref, times = greedy_decode(fw32, bb32.config, prompt, steps)
        got, times8 = greedy_decode(fw8, bb8.config, prompt, steps, forced=ref)
        agree += sum(a == b for a, b in zip(ref, got))
        total += len(ref)
        t32 += times
        t8 += times8
    s32, s8 = statistics.median(t32), statistics.median(t8)
    return {"prompts": len(prompts), "steps_per_prompt": steps,
            "float32_tokens_per_s": 1 / s32, "int8_tokens_per_s": 1 / s8, "speedup": s32 / s8,
            "greedy_agreement": agree / total, "steps_compared": total,
            "float32_region_mib": bb32.manifest.size / 2**20,
            "int8_region_mib": bb8.manifest.size / 2**20}

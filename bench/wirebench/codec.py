"""1. Codec cost per message: encode, decode and both, mean per call (calibrated repeats)."""
from __future__ import annotations

import statistics
from itertools import repeat

from ipc import codec

from bench.wirebench.plan import Plan, perf_ns
from bench.wirebench.samples import same_message, sample_messages

def _loop_encode(msg, n):
    enc = codec.encode
    t0 = perf_ns()
    for _ in repeat(None, n):
        enc(msg)
    return perf_ns() - t0


def _loop_decode(frames, n):
    dec = codec.decode
    t0 = perf_ns()
    for _ in repeat(None, n):
        dec(frames)
    return perf_ns() - t0


def _loop_both(msg, n):
    enc, dec = codec.encode, codec.decode
    t0 = perf_ns()
    for _ in repeat(None, n):
        dec(enc(msg))
    return perf_ns() - t0


def _time_us(loop, arg, plan: Plan) -> tuple[float, float, int]:
    """(median, min) over plan.codec_repeats of the mean time per call in us, and N per repeat
    (calibrated so that one repeat lasts about plan.codec_target_s). The min is the steadier
    figure on a busy host; the median is the headline."""
    probe_n = 20
    per_call_ns = max(loop(arg, probe_n) / probe_n, 50.0)
    n = int(min(max(plan.codec_target_s * 1e9 / per_call_ns, 20), 200_000))
    loop(arg, max(n // 10, 5))                                   # warm-up
    runs = [loop(arg, n) / n / 1e3 for _ in range(plan.codec_repeats)]
    return statistics.median(runs), min(runs), n


def bench_codec(plan: Plan) -> list[dict]:
    rows = []
    for label, msg in sample_messages():
        frames = codec.encode(msg)
        back = codec.decode(frames)
        if not same_message(back, msg):
            raise AssertionError(f"{label}: codec round trip changed the message")
        enc_us, enc_min, n = _time_us(_loop_encode, msg, plan)
        dec_us, dec_min, _ = _time_us(_loop_decode, frames, plan)
        both_us, both_min, _ = _time_us(_loop_both, msg, plan)
        rows.append({"message": label, "type": msg.TYPE, "frames": len(frames),
                     "header_bytes": len(frames[0]),
                     "tensor_bytes": sum(memoryview(f).nbytes for f in frames[1:]),
                     "iterations": n, "repeats": plan.codec_repeats,
                     "encode_us": enc_us, "decode_us": dec_us, "encode_decode_us": both_us,
                     "encode_min_us": enc_min, "decode_min_us": dec_min,
                     "encode_decode_min_us": both_min})
    return rows

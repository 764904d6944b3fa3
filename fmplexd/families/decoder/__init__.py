"""Decoder LLMs (Llama-style: SmolLM2): GGUF or HF directories; generation in iterations over a
paged KV pool, many tasks' sequences (each with its own LoRA / IA3) in one forward per step."""
from __future__ import annotations

from fmplexd.families.decoder.loader import is_decoder_path as detect
from fmplexd.families.decoder.loader import load
from ipc.messages import Family

FAMILY = Family.DECODER


def make_runner(backbone, settings):
    from fmplexd.families.decoder.runner import DecoderRunner
    return DecoderRunner(backbone, settings)


__all__ = ["FAMILY", "detect", "load", "make_runner"]

"""Text encoders (BERT, RoBERTa, MiniLM): HF directories, one packed multi-task forward per batch."""
from __future__ import annotations

from fmplexd.families.encoder.loader import is_encoder_dir as detect
from fmplexd.families.encoder.loader import load
from ipc.messages import Family

FAMILY = Family.TEXT_ENCODER


def make_runner(backbone, settings):
    from fmplexd.families.encoder.runner import EncoderRunner
    return EncoderRunner(backbone, settings.token_budget, settings.max_batch_requests,
                         settings.max_request_tokens, settings.batch_target_ms / 1e3)


__all__ = ["FAMILY", "detect", "load", "make_runner"]

"""Vision transformers (DINOv2, ViT): HF directories, or DINOv2 extracted from an ONNX graph; one
packed multi-task forward per batch of images."""
from __future__ import annotations

from fmplexd.families.vision.loader import detect, load
from ipc.messages import Family

FAMILY = Family.VISION


def make_runner(backbone, settings):
    from fmplexd.families.vision.runner import VisionRunner
    return VisionRunner(backbone, settings.token_budget, settings.max_batch_requests,
                        settings.max_request_tokens, settings.batch_target_ms / 1e3)


__all__ = ["FAMILY", "detect", "load", "make_runner"]

"""The vision family's runner: a SubmitImages costs its images' rows (1 + patches each, the tokens
the transformer runs) and runs in one packed forward with other tasks' images
(fmplexd.families.batch_runner: batches, pinned extension versions, Results)."""
from __future__ import annotations

import numpy as np

from fmplexd.families.base import Backbone
from fmplexd.families.batch_runner import BatchRunner, bare_view, oversized
from fmplexd.families.vision.executor import Executor, WorkItem
from fmplexd.families.vision.forward import VisionTransformer
from fmplexd.slots import ExtensionView
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import MAX_IMAGES, Output, SubmitImages


class VisionRunner(BatchRunner):
    accepts = frozenset({SubmitImages})
    outputs = frozenset({Output.POOLED, Output.LOGITS, Output.TOKENS})

    def __init__(self, backbone: Backbone, token_budget: int, max_requests: int,
                 max_request_tokens: int, batch_target_s: float = 0.0):
        super().__init__(backbone, token_budget, max_requests, batch_target_s)
        self.executor = Executor(VisionTransformer(backbone.config, backbone.weights))
        self.max_request_tokens = max_request_tokens

    def warm_item(self) -> tuple[WorkItem, int]:
        cfg = self.backbone.config
        size = cfg.image.size - cfg.image.size % cfg.patch
        pixels = np.zeros((1, cfg.channels, size, size), np.float32)
        return WorkItem(bare_view(), Output.POOLED, pixels), 1 + (size // cfg.patch) ** 2

    def cost(self, msg: SubmitImages, view: ExtensionView) -> int:
        """Validate the pixels' shape against the backbone; the cost is the images' rows."""
        cfg = self.backbone.config
        n, c, h, w = msg.pixels.shape
        if not 1 <= n <= MAX_IMAGES or c != cfg.channels:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"pixels must be (n, {cfg.channels}, H, W) "
                              f"with 1 <= n <= {MAX_IMAGES}; got {list(msg.pixels.shape)}")
        p = cfg.patch
        if h % p or w % p or not h or not w:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"image sides must be multiples of the "
                              f"patch ({p} pixels); got {h} x {w}")
        largest = cfg.grid * p
        if cfg.model_type == "vit" and (h, w) != (largest, largest):
            raise FmplexError(ErrorCode.INVALID_INPUT, f"ViT backbone {self.backbone.name} takes "
                              f"{largest} x {largest} images only; got {h} x {w}")
        if h > largest or w > largest:
            raise oversized(f"an image of {h} x {w} pixels", largest, self.backbone)
        cost = n * (1 + (h // p) * (w // p))
        if cost > self.max_request_tokens:
            raise FmplexError(ErrorCode.OVERSIZED, f"request of {cost} rows exceeds the daemon's "
                              f"limit of {self.max_request_tokens}")
        if not np.isfinite(msg.pixels).all():
            raise FmplexError(ErrorCode.INVALID_INPUT, "pixels must be finite")
        return cost

    def item(self, msg: SubmitImages, view: ExtensionView) -> WorkItem:
        return WorkItem(view, msg.output, msg.pixels)

    def execute(self, items: list[WorkItem]) -> list[np.ndarray]:
        return self.executor.run(items)

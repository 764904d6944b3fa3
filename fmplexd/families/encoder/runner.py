"""The text-encoder family's runner: a Submit (token ids of one or more sequences) costs its tokens
(virtual prompt rows included) and runs in one packed forward with other tasks' requests
(fmplexd.families.batch_runner: batches, pinned extension versions, Results)."""
from __future__ import annotations

import numpy as np

from fmplexd.families.base import Backbone
from fmplexd.families.batch_runner import BatchRunner, bare_view
from fmplexd.families.encoder.executor import Executor, WorkItem
from fmplexd.families.encoder.forward import Encoder
from fmplexd.slots import ExtensionView
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import Output, Submit


class EncoderRunner(BatchRunner):
    accepts = frozenset({Submit})
    outputs = frozenset(Output) - {Output.FORECAST}

    def __init__(self, backbone: Backbone, token_budget: int, max_requests: int,
                 max_request_tokens: int, batch_target_s: float = 0.0):
        super().__init__(backbone, token_budget, max_requests, batch_target_s)
        self.executor = Executor(Encoder(backbone.config, backbone.weights))
        self.max_request_tokens = max_request_tokens

    def warm_item(self, tokens: int = 256) -> tuple[WorkItem, int]:
        n = max(1, tokens // 32)
        return WorkItem(bare_view(), Output.POOLED, np.full(32 * n, 1000, np.int32), [32] * n), 32 * n

    def cost(self, msg: Submit, view: ExtensionView) -> int:
        """Validate ids and lengths against the backbone; the cost is the request's tokens."""
        cfg = self.backbone.config
        _check_ids(msg, cfg.vocab, cfg.type_vocab)
        limit = cfg.max_positions - view.prompt_tokens
        longest = max(msg.lengths)
        if longest > limit:
            raise FmplexError(ErrorCode.OVERSIZED, f"a sequence of {longest} tokens exceeds the "
                              f"{limit} positions left by backbone {self.backbone.name}")
        cost = int(len(msg.ids)) + view.prompt_tokens * len(msg.lengths)
        if cost > self.max_request_tokens:
            raise FmplexError(ErrorCode.OVERSIZED, f"request of {cost} tokens exceeds the "
                              f"daemon's limit of {self.max_request_tokens}")
        return cost

    def item(self, msg: Submit, view: ExtensionView) -> WorkItem:
        return WorkItem(view, msg.output, msg.ids, msg.lengths, msg.type_ids)

    def execute(self, items: list[WorkItem]) -> list[np.ndarray]:
        return self.executor.run(items)


def _check_ids(msg: Submit, vocab: int, type_vocab: int) -> None:
    if sum(msg.lengths) != len(msg.ids):
        raise FmplexError(ErrorCode.INVALID_INPUT,
                          f"lengths sum to {sum(msg.lengths)} but {len(msg.ids)} ids were sent")
    if len(msg.ids) and (int(msg.ids.min()) < 0 or int(msg.ids.max()) >= vocab):
        raise FmplexError(ErrorCode.INVALID_INPUT, f"token ids must lie in [0, {vocab})")
    t = msg.type_ids
    if t is not None:
        if len(t) != len(msg.ids):
            raise FmplexError(ErrorCode.INVALID_INPUT, "type_ids and ids differ in length")
        if len(t) and (int(np.min(t)) < 0 or int(np.max(t)) >= type_vocab):
            raise FmplexError(ErrorCode.INVALID_INPUT, f"type ids must lie in [0, {type_vocab})")

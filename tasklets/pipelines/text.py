"""Text-encoder pipelines: tokenize with the backbone's own tokenizer (tokenizers on tokenizer.json),
submit, and turn the executor's output into the client's answer (numpy only).

Over-long inputs are truncated to the positions the backbone leaves (its limit minus the task's
virtual prompt tokens); the reply marks each truncated input (`truncated[i] = true`).

    text-embedding        pooled rows, L2-normalised                  -> embeddings (n, H)
    text-classification   softmax over the head's logits, top-k       -> labels [[{label, score}]]
    token-classification  per-token softmax, arg-max label, special   -> tokens [[{start, end,
                          tokens dropped, character offsets kept          label, score}]]
    sentence-similarity   cosine of the normalised embeddings of       -> similarity [float]
                          texts[i] and pairs[i]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ipc.errors import ErrorCode, FmplexError
from ipc.messages import (MAX_SEQUENCES, BackboneInfo, Infer, InferReply, Result, Submit,
                          TokenLabel)
from ipc.spec import Pipeline, TaskSpec
from tasklets.pipelines.post import labelled, normalize, softmax
from tasklets.pipelines.tokenizer_cache import load_tokenizer


@dataclass(slots=True)
class Encoded:
    ids: np.ndarray                 # (sum len,) int32
    lengths: list[int]
    truncated: list[bool]
    offsets: list[list[tuple[int, int]]]     # per sequence, per token: character span
    special: list[list[int]]                 # per sequence, per token: 1 if special


class TextPipeline:
    """Infer -> tokenize -> Submit -> Result -> InferReply (one daemon request per client request)."""

    accepts = frozenset({Infer})

    def __init__(self, spec: TaskSpec, info: BackboneInfo, prompt_tokens: int = 0):
        if not info.tokenizer:
            raise FmplexError(ErrorCode.INVALID_INPUT, "the backbone has no tokenizer.json")
        self.spec = spec
        self.max_length = info.max_positions - prompt_tokens
        self.tokenizer = load_tokenizer(info.tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)

    @property
    def output(self):
        return self.spec.pipeline.output

    async def serve(self, msg: Infer, call, client, deadline_ms: int) -> InferReply:
        enc = self.encode(msg.texts, msg.pairs)
        result: Result = await call.request(Submit, output=self.output, lengths=enc.lengths,
                                            ids=enc.ids, deadline_ms=deadline_ms)
        return self.reply(msg.ref, call.task, result.version, enc, result.data,
                          msg.top_k or self.spec.top_k)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> Encoded:
        if self.spec.pipeline is Pipeline.SIMILARITY:
            if pairs is None or len(pairs) != len(texts):
                raise FmplexError(ErrorCode.INVALID_INPUT,
                                  "sentence-similarity needs `pairs`, one per text")
            if 2 * len(texts) > MAX_SEQUENCES:
                raise FmplexError(ErrorCode.INVALID_INPUT,
                                  f"at most {MAX_SEQUENCES // 2} pairs per request")
            texts = list(texts) + list(pairs)
        elif pairs is not None:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"a {self.spec.pipeline.value} task takes no pairs")
        encs = self.tokenizer.encode_batch(texts)
        ids = np.fromiter((i for e in encs for i in e.ids), np.int32)
        return Encoded(ids=ids, lengths=[len(e.ids) for e in encs],
                       truncated=[bool(e.overflowing) for e in encs],
                       offsets=[e.offsets for e in encs],
                       special=[e.special_tokens_mask for e in encs])

    def reply(self, ref: int, task: str, version: int, enc: Encoded, data: np.ndarray,
              top_k: int) -> InferReply:
        kind = self.spec.pipeline
        truncated = enc.truncated
        common = {"ref": ref, "task": task, "version": version,
                  "prompt_tokens": int(sum(enc.lengths))}
        if kind is Pipeline.EMBEDDING:
            return InferReply(truncated=truncated, embeddings=normalize(data), **common)
        if kind is Pipeline.SIMILARITY:
            n = len(enc.lengths) // 2
            e = normalize(data)
            sims = np.einsum("ij,ij->i", e[:n], e[n:])
            return InferReply(truncated=[a or b for a, b in zip(truncated[:n], truncated[n:])],
                              similarity=[float(s) for s in sims], **common)
        if kind is Pipeline.CLASSIFICATION:
            return InferReply(truncated=truncated, labels=labelled(data, self.spec.labels, top_k),
                              **common)
        probs = softmax(data)
        tokens, start = [], 0
        for n, offsets, special in zip(enc.lengths, enc.offsets, enc.special):
            rows = probs[start:start + n]
            start += n
            best = rows.argmax(axis=1)
            tokens.append([TokenLabel(start=int(a), end=int(b), label=self.spec.labels[k],
                                      score=float(rows[t, k]))
                           for t, ((a, b), s, k) in enumerate(zip(offsets, special, best)) if not s])
        return InferReply(truncated=truncated, tokens=tokens, **common)

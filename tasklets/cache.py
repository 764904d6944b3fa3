"""A task's result cache: repeated requests answered from the task process's own memory (its
tenant's), without a trip to the daemon. Off unless the spec sets `cache_mb` (> 0).

    key     blake2b of (variant name, extension version, pipeline kind, the request as it travels
            with `ref`, `timeout_ms`, `proto` zeroed and `stream` off): the input, the output kind
            and every parameter (top_k, pairs, horizon, quantiles, sampling settings) are in it
    what    deterministic outputs only: every one-forward pipeline (text, image, series); a
            generation only when greedy (temperature 0, the request's or the task's default) or
            seeded, and only once it finished (stop / length), never a cancelled one
    bound   `capacity_bytes` of encoded replies (the frames a reply travels as, plus OVERHEAD per
            entry); least recently used entries go first; a reply over an eighth of the bound is
            not stored
    hit     the reply the miss returned, with the new request's ref: equal field by field (arrays
            are stored read-only); a streaming generation's hit sends its whole text as one
            text_delta before the reply
    stale   a key names the extension version, and `clear()` runs on update, promote, rollback

Counters (hits, misses = lookups of cacheable requests that found nothing, entries, bytes) are
kept per variant; the task process reports them to the daemon (CacheStats), which counts them in
its task stats and metrics.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from ipc import codec
from ipc.messages import (FinishReason, GenerateReply, GenerateText, Message, TextDelta)

OVERHEAD = 256                  # bytes charged per entry beyond its frames (key, bookkeeping)
LARGEST_SHARE = 8               # a reply larger than capacity / LARGEST_SHARE is not stored


@dataclass(slots=True)
class Counts:
    hits: int = 0
    misses: int = 0
    entries: int = 0
    bytes: int = 0


class ResultCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self._entries: collections.OrderedDict[bytes, tuple[str, Message, int]] = \
            collections.OrderedDict()
        self.counts: dict[str, Counts] = collections.defaultdict(Counts)   # per variant
        self.bytes = 0

    # -- keys -------------------------------------------------------------------------------------

    @staticmethod
    def key(variant: str, version: int, kind: str, msg: Message, greedy_default: bool = True
            ) -> bytes | None:
        """The request's key, or None if its answer is not deterministic (a generation sampled
        without a seed; `greedy_default`: the task's default temperature is 0)."""
        if isinstance(msg, GenerateText):
            greedy = msg.temperature == 0 if msg.temperature is not None else greedy_default
            if not greedy and msg.seed is None:
                return None
            msg = dataclasses.replace(msg, stream=False)
        msg = dataclasses.replace(msg, ref=0, timeout_ms=0, proto=0)
        h = hashlib.blake2b(digest_size=16)
        for part in (variant, str(version), kind):
            h.update(part.encode() + b"\0")
        for frame in codec.encode(msg):
            h.update(memoryview(frame).nbytes.to_bytes(8, "little"))
            h.update(frame)
        return h.digest()

    # -- lookups ----------------------------------------------------------------------------------

    def get(self, key: bytes, variant: str, ref: int) -> Message | None:
        """The stored reply for `key` with `ref` as its ref (counted as a hit), else None (a
        miss)."""
        found = self._entries.get(key)
        if found is None:
            self.counts[variant].misses += 1
            return None
        self._entries.move_to_end(key)
        self.counts[variant].hits += 1
        return dataclasses.replace(found[1], ref=ref)

    def put(self, key: bytes, variant: str, reply: Message) -> bool:
        """Store a successful reply (False if it is not kept: too large, or an unfinished
        generation)."""
        if isinstance(reply, GenerateReply) and reply.finish_reason not in (FinishReason.STOP,
                                                                            FinishReason.LENGTH):
            return False
        size = OVERHEAD + sum(memoryview(f).nbytes for f in codec.encode(reply))
        if size * LARGEST_SHARE > self.capacity or key in self._entries:
            return False
        _freeze(reply)
        self._entries[key] = (variant, reply, size)
        self._account(variant, size, +1)
        while self.bytes > self.capacity:
            _, (old_variant, _, old_size) = self._entries.popitem(last=False)
            self._account(old_variant, old_size, -1)
        return True

    def clear(self) -> None:
        """Forget every stored reply (an update, promote or rollback); counters of hits and
        misses go on."""
        self._entries.clear()
        self.bytes = 0
        for c in self.counts.values():
            c.entries = c.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _account(self, variant: str, size: int, sign: int) -> None:
        c = self.counts[variant]
        c.entries += sign
        c.bytes += sign * size
        self.bytes += sign * size


def replay(reply: Message, request: Message, send) -> None:
    """What a miss would have sent before its final reply: for a streaming generation, its whole
    text as one text_delta (`send` is the client channel's)."""
    if isinstance(reply, GenerateReply) and isinstance(request, GenerateText) and request.stream:
        send(TextDelta(ref=request.ref, text=reply.text, token_ids=list(reply.token_ids)))


def _freeze(reply: Message) -> None:
    """Stored arrays become read-only: a hit can never see a changed reply."""
    for f in dataclasses.fields(reply):
        value = getattr(reply, f.name)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False

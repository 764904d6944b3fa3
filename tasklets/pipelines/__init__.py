"""A task's pipeline: the client requests it serves and how (pre-process -> daemon request(s) ->
post-process), one module per kind of pipeline:

    text.py          text-embedding, text-classification, token-classification, sentence-similarity
                     (Infer -> Submit -> Result -> InferReply)

A pipeline sees the daemon only through a DaemonCall bound to the task's current session, and its
client only through `send` (extra messages before the final reply, e.g. a stream). numpy only: no
torch in a task process.
"""
from __future__ import annotations

from typing import AsyncIterator, Callable, Protocol

from ipc.messages import BackboneInfo, Message
from ipc.spec import TaskSpec


class DaemonCall(Protocol):
    """The task's current session on the task plane (tasklets.daemon_link.SessionCall); `task` is
    the name of the variant it serves (e.g. "sentiment@canary")."""
    task: str

    async def request(self, cls: type, **fields) -> Message: ...
    def stream(self, cls: type, **fields) -> AsyncIterator[Message]: ...


Send = Callable[[Message], bool]      # to the requesting client; False when it has gone


class Pipeline(Protocol):
    accepts: frozenset[type]          # client-endpoint message types

    async def serve(self, msg: Message, call: DaemonCall, send: Send, deadline_ms: int
                    ) -> Message: ...


MODULES = ("tasklets.pipelines.text",)     # every pipeline module (the zygote preloads them)


def make_pipeline(spec: TaskSpec, info: BackboneInfo, prompt_tokens: int = 0) -> Pipeline:
    """The pipeline of the spec's kind for backbone `info` (`prompt_tokens`: virtual tokens the
    task's extension puts before each input)."""
    from tasklets.pipelines.text import TextPipeline
    return TextPipeline(spec, info, prompt_tokens)

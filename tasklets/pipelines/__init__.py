"""A task's pipeline: the client requests it serves and how (pre-process -> daemon request(s) ->
post-process), one module per kind of pipeline:

    text.py          text-embedding, text-classification, token-classification, sentence-similarity
                     (Infer -> Submit -> Result -> InferReply)
    generation.py    text-generation (GenerateText -> Generate -> Tokens... -> TextDelta...,
                     GenerateReply)

A pipeline sees the daemon only through a DaemonCall bound to the task's current session, and its
client only through a ClientChannel (tasklets.endpoint: `send` for messages before the final reply,
e.g. a stream, False once the client has gone; `cancelled`, set by the client's CancelRequest).
numpy only: no torch in a task process.
"""
from __future__ import annotations

from typing import Protocol

from ipc.messages import BackboneInfo, Message
from ipc.spec import TaskSpec


class DaemonCall(Protocol):
    """The task's current session on the task plane (tasklets.daemon_link.SessionCall); `task` is
    the name of the variant it serves (e.g. "sentiment@canary")."""
    task: str

    async def request(self, cls: type, **fields) -> Message: ...
    def stream(self, cls: type, **fields): ...       # -> tasklets.daemon_link.Stream


class Pipeline(Protocol):
    accepts: frozenset[type]          # client-endpoint message types

    async def serve(self, msg: Message, call: DaemonCall, client, deadline_ms: int
                    ) -> Message: ...


MODULES = ("tasklets.pipelines.text", "tasklets.pipelines.generation")  # the zygote preloads them


def make_pipeline(spec: TaskSpec, info: BackboneInfo, prompt_tokens: int = 0) -> Pipeline:
    """The pipeline of the spec's kind for backbone `info` (`prompt_tokens`: virtual tokens the
    task's extension puts before each input)."""
    from ipc.spec import Pipeline as Kind
    if spec.pipeline is Kind.GENERATION:
        from tasklets.pipelines.generation import GenerationPipeline
        return GenerationPipeline(spec, info)
    from tasklets.pipelines.text import TextPipeline
    return TextPipeline(spec, info, prompt_tokens)

"""A task's pipeline: the client requests it serves and how (pre-process -> daemon request(s) ->
post-process), one module per kind of pipeline:

    text.py          text-embedding, text-classification, token-classification, sentence-similarity
                     (Infer -> Submit -> Result -> InferReply)
    generation.py    text-generation (GenerateText -> Generate -> Tokens... -> TextDelta...,
                     GenerateReply)
    vision.py        image-classification, image-embedding
                     (InferImages -> SubmitImages -> Result -> InferReply)
    series.py        time-series-forecasting, time-series-classification
                     (InferSeries -> SubmitSeries (per horizon block) -> Result -> ForecastReply
                     or InferReply)

A pipeline sees the daemon only through a DaemonCall bound to the task's current session, and its
client only through a ClientChannel (tasklets.endpoint: `send` for messages before the final reply,
e.g. a stream, False once the client has gone; `cancelled`, set by the client's CancelRequest).
numpy only: no torch in a task process.
"""
from __future__ import annotations

from typing import Protocol

from ipc.errors import ErrorCode, FmplexError
from ipc.messages import BackboneInfo, Family, Message
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


MODULES = ("tasklets.pipelines.text",     # every pipeline module (the zygote preloads them)
           "tasklets.pipelines.generation", "tasklets.pipelines.vision",
           "tasklets.pipelines.series")


def make_pipeline(spec: TaskSpec, info: BackboneInfo, prompt_tokens: int = 0) -> Pipeline:
    """The pipeline of the spec's kind for backbone `info` (`prompt_tokens`: virtual tokens the
    task's extension puts before each input)."""
    family = spec.pipeline.family
    if family is not info.family:
        raise FmplexError(ErrorCode.INVALID_INPUT, f"a {spec.pipeline.value} task needs a "
                          f"{family.value} backbone; {info.name} is a {info.family.value} backbone")
    if family is Family.DECODER:
        from tasklets.pipelines.generation import GenerationPipeline
        return GenerationPipeline(spec, info)
    if family is Family.VISION:
        from tasklets.pipelines.vision import ImagePipeline
        return ImagePipeline(spec, info)
    if family is Family.TIME_SERIES:
        from tasklets.pipelines.series import SeriesPipeline
        return SeriesPipeline(spec, info)
    from tasklets.pipelines.text import TextPipeline
    return TextPipeline(spec, info, prompt_tokens)

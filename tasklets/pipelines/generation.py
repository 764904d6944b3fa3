"""The text-generation pipeline: GenerateText -> prompt ids -> Generate -> Tokens... -> text.

Prompt: a raw `prompt` is tokenized as written (special tokens such as <|im_start|> in the text are
recognized, nothing is added: transformers' tokenizer with add_special_tokens=False); chat
`messages` are rendered with the backbone's chat template (Jinja, in a sandbox, as transformers
renders it) with the generation prompt appended, the task's system prompt first when the chat has
none. Sampling settings come from the request, else from the task's spec.

Text: generated ids are detokenized as they come (special tokens skipped); stop strings are looked
for in the text, and the first match ends the generation (finish "stop", the text cut before it,
the daemon told to stop at once). While streaming, text that might still turn into a stop string
or is an incomplete UTF-8 character is held back. Without `stream`, a TextDelta still goes out at
most every KEEPALIVE_S: a client that went away is then noticed (its send fails) and the
generation cancelled, freeing its KV at once. A client's CancelRequest cancels the same way and the
reply then says finish "cancelled".
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ipc.errors import ErrorCode, FmplexError
from ipc.messages import (BackboneInfo, ChatMessage, FinishReason, Generate, GenerateReply,
                          GenerateText, TextDelta, Tokens)
from ipc.spec import TaskSpec
from tasklets.pipelines.tokenizer_cache import load_tokenizer

KEEPALIVE_S = 0.5


class GenerationPipeline:
    accepts = frozenset({GenerateText})

    def __init__(self, spec: TaskSpec, info: BackboneInfo):
        if info.generation is None or not info.tokenizer:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"backbone {info.name} cannot generate "
                              "(no tokenizer or generation settings)")
        self.spec, self.info, self.gen = spec, info, info.generation
        self.tokenizer = load_tokenizer(info.tokenizer)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._template = None

    # -- prompt -------------------------------------------------------------------------------

    def prompt_ids(self, msg: GenerateText) -> np.ndarray:
        if (msg.prompt is None) == (msg.messages is None):
            raise FmplexError(ErrorCode.INVALID_INPUT, "give either `prompt` or `messages`")
        text = msg.prompt if msg.prompt is not None else self.render(msg.messages)
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
        if len(ids) == 0:
            raise FmplexError(ErrorCode.INVALID_INPUT, "the prompt is empty")
        if len(ids) >= self.gen.context:
            raise FmplexError(ErrorCode.OVERSIZED, f"a prompt of {len(ids)} tokens leaves no room "
                              f"in the {self.gen.context}-token context of {self.info.name}")
        return ids

    def render(self, messages: list[ChatMessage]) -> str:
        """The chat as the model's template writes it, ready for the assistant's turn."""
        chat = [{"role": m.role, "content": m.content} for m in messages]
        if self.spec.system_prompt and chat[0]["role"] != "system":
            chat.insert(0, {"role": "system", "content": self.spec.system_prompt})
        if not self.gen.chat_template:
            raise FmplexError(ErrorCode.INVALID_INPUT, f"backbone {self.info.name} has no chat "
                              "template: send a raw prompt")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            try:
                self._template = env.from_string(self.gen.chat_template)
            except TemplateError as e:
                raise FmplexError(ErrorCode.INVALID_INPUT, f"the chat template does not "
                                  f"compile: {e}") from None
        return self._template.render(messages=chat, add_generation_prompt=True)

    # -- serving ------------------------------------------------------------------------------

    async def serve(self, msg: GenerateText, call, client, deadline_ms: int) -> GenerateReply:
        ids = self.prompt_ids(msg)
        d = self.spec.generation
        stop = tuple(msg.stop if msg.stop is not None else d.stop)
        stream = call.stream(
            Generate, prompt=ids, max_tokens=msg.max_tokens or d.max_tokens,
            temperature=d.temperature if msg.temperature is None else msg.temperature,
            top_p=d.top_p if msg.top_p is None else msg.top_p,
            top_k=d.top_k if msg.top_k is None else msg.top_k, seed=msg.seed,
            stop_ids=list(msg.stop_token_ids or []), ignore_eos=msg.ignore_eos,
            deadline_ms=deadline_ms)
        text = _Text(self.tokenizer, stop)
        watcher = asyncio.get_running_loop().create_task(_cancel_on(client.cancelled, stream))
        last: Tokens | None = None
        sent_at, reason = time.monotonic(), None
        try:
            async for tokens in stream:
                last = tokens
                if text.add(tokens.ids) and reason is None:
                    reason = FinishReason.STOP          # a stop string: the daemon stops too
                    stream.cancel()
                now, final = time.monotonic(), tokens.finish is not None
                if msg.stream or (not final and now - sent_at >= KEEPALIVE_S):
                    delta, delta_ids = text.take(final)
                    if (delta or delta_ids or not msg.stream) and \
                            not client.send(TextDelta(ref=msg.ref, text=delta, token_ids=delta_ids)):
                        stream.close()                  # the client went away
                        raise FmplexError(ErrorCode.TASK_UNAVAILABLE, "the client went away")
                    sent_at = now
        finally:
            watcher.cancel()
            stream.close()
        finish = reason or last.finish
        return GenerateReply(ref=msg.ref, task=call.task, version=last.version,
                             text=text.final(), token_ids=text.ids,
                             prompt_tokens=last.prompt_tokens,
                             completion_tokens=last.completion_tokens, finish_reason=finish)


async def _cancel_on(event: asyncio.Event, stream) -> None:
    await event.wait()
    stream.cancel()


class _Text:
    """Generated ids -> text, with stop strings and what has been streamed so far."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.cut: int | None = None           # where a stop string starts, once one matched
        self.sent_text = self.sent_ids = 0

    def add(self, ids: list[int]) -> bool:
        """Append ids; True when a stop string appeared (first time)."""
        if self.cut is not None:
            self.ids += ids
            return False
        self.ids += ids
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.cut = min(hits)
            return True
        return False

    def final(self) -> str:
        return self.text if self.cut is None else self.text[:self.cut]

    def take(self, final: bool) -> tuple[str, list[int]]:
        """The text and ids not streamed yet; unless final, holding back what may still change."""
        end = len(self.final())
        if not final:
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = max(self.sent_text, end - hold)
            while end > self.sent_text and self.text[end - 1] == "\ufffd":
                end -= 1
        delta = self.final()[self.sent_text:end]
        ids = self.ids[self.sent_ids:]
        self.sent_text, self.sent_ids = end, len(self.ids)
        return delta, ids

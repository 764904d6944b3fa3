"""OpenAI's request and response shapes, and fmplex's own for its other task kinds: requests are
checked here (a bad field is a 400 naming it) and turned into fmplex client calls; replies become
the JSON bodies and SSE chunks OpenAI's clients parse. Nothing here does I/O.

Generation fields (chat and completions): max_tokens (or max_completion_tokens), temperature,
top_p, seed, stop (string or list), n (1 only), stream, stream_options.include_usage; fmplex
extensions (as vLLM's, through the clients' extra_body): top_k, ignore_eos, timeout_ms. Fields
that would change the answer and that fmplex does not do (n > 1, logprobs, tools, penalties,
logit_bias, a non-text response_format, echo, best_of, suffix) are refused, not ignored; `user`
and unknown fields are ignored.
"""
from __future__ import annotations

import base64
import binascii
import math
import secrets
import time

import numpy as np

from fmplex.gateway.errors import bad_request
from ipc.messages import (MAX_NEW_TOKENS, FinishReason, ForecastReply, GenerateReply,
                          InferReply)

MAX_TIMEOUT_MS = 3_600_000
ROLES = {"system", "user", "assistant", "tool", "developer"}
# field -> the value(s) that mean "off"; anything else is refused
UNSUPPORTED = {"n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,),
               "echo": (False,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",),
               "functions": ([],), "function_call": ("none",), "presence_penalty": (0, 0.0),
               "frequency_penalty": (0, 0.0), "logit_bias": ({},)}


# ------------------------------------------------------------------ checking fields

def get(body: dict, name: str, kind, default=None):
    """body[name] if present and not null, of type `kind` (bool is no number), else `default`."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise bad_request(f"`{name}` must be {names}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_request(f"`{name}` must be finite", name)
    return value


def ranged(body: dict, name: str, lo, hi, kind=int):
    value = get(body, name, kind)
    if value is not None and not lo <= value <= hi:
        raise bad_request(f"`{name}` must lie in [{lo}, {hi}]", name)
    return value


def refuse_unsupported(body: dict) -> None:
    for name, off in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value not in off:
            raise bad_request(f"`{name}` = {value!r} is not supported by fmplex", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("only the text `response_format` is supported", "response_format")


def texts(body: dict, name: str = "input") -> list[str]:
    """A string or a non-empty list of strings (token-id inputs are not supported)."""
    value = body.get(name)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise bad_request(f"`{name}` must be a string or a non-empty list of strings", name)


# ------------------------------------------------------------------ generation requests

def generation(body: dict, default_timeout_s: float) -> tuple[dict, bool, bool, float]:
    """(sampling kwargs for Client.generate / stream, stream, include_usage, timeout_s)."""
    refuse_unsupported(body)
    max_tokens = ranged(body, "max_completion_tokens", 1, MAX_NEW_TOKENS)
    if max_tokens is None:
        max_tokens = ranged(body, "max_tokens", 1, MAX_NEW_TOKENS)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("`stop` must be a string or a list of strings", "stop")
    sampling = {"max_tokens": max_tokens, "stop": stop,
                "temperature": ranged(body, "temperature", 0.0, 100.0, (int, float)),
                "top_p": ranged(body, "top_p", 0.0, 1.0, (int, float)),
                "top_k": ranged(body, "top_k", 0, 1 << 20),
                "seed": ranged(body, "seed", 0, (1 << 64) - 1),
                "ignore_eos": get(body, "ignore_eos", bool, False)}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    stream = get(body, "stream", bool, False)
    options = get(body, "stream_options", dict, {})
    usage = bool(get(options, "include_usage", bool, False))
    return sampling, stream, usage, timeout(body, default_timeout_s)


def timeout(body: dict, default_s: float) -> float:
    """The request's deadline in seconds: fmplex's `timeout_ms` extension, else the gateway's."""
    timeout_ms = ranged(body, "timeout_ms", 1, MAX_TIMEOUT_MS)
    return timeout_ms / 1e3 if timeout_ms else default_s


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> fmplex chat messages ({role, content}); text content parts are joined,
    `developer` is a system message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad_request(f"messages[{i}] needs a role in {sorted(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise bad_request(f"messages[{i}]: only text content parts are supported",
                                  "messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or text parts",
                              "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def completion_prompt(body: dict) -> str:
    prompt = texts(body, "prompt")
    if len(prompt) != 1:
        raise bad_request("one prompt per request (n = 1)", "prompt")
    return prompt[0]


# ------------------------------------------------------------------ generation responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def finish(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage(reply: GenerateReply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def chat_completion(reply: GenerateReply, rid: str, model: str) -> dict:
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model,
            "system_fingerprint": f"fmplex-v{reply.version}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": None, "finish_reason": finish(reply.finish_reason)}],
            "usage": usage(reply)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, reason: str | None,
               with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion(reply: GenerateReply, rid: str, model: str) -> dict:
    return {"id": rid, "object": "text_completion", "created": now(), "model": model,
            "system_fingerprint": f"fmplex-v{reply.version}",
            "choices": [{"index": 0, "text": reply.text, "logprobs": None,
                         "finish_reason": finish(reply.finish_reason)}],
            "usage": usage(reply)}


def completion_chunk(rid: str, model: str, created: int, text: str, reason: str | None,
                     with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(first: dict, reply: GenerateReply) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {**first, "choices": [], "usage": usage(reply)}


# ------------------------------------------------------------------ embeddings and fmplex kinds

def embeddings(reply: InferReply, model: str, encoding: str) -> dict:
    rows = reply.embeddings
    if encoding == "base64":
        data = [base64.b64encode(np.ascontiguousarray(r, "<f4").tobytes()).decode() for r in rows]
    else:
        data = [r.tolist() for r in rows]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}


def encoding_format(body: dict) -> str:
    fmt = get(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise bad_request("`encoding_format` must be float or base64", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad_request("`dimensions` is not supported (the task's backbone decides)",
                          "dimensions")
    return fmt


def labelled(reply: InferReply, model: str, inputs: list[str] | None = None) -> dict:
    """fmplex's classification answer: per input its labels, tokens (with their text) or
    similarity; for images its labels or embedding."""
    data = []
    n = len(reply.truncated)
    for i in range(n):
        item = {"index": i, "truncated": reply.truncated[i]}
        if reply.labels is not None:
            item["labels"] = [{"label": x.label, "score": x.score} for x in reply.labels[i]]
        if reply.tokens is not None:
            item["tokens"] = [{"start": t.start, "end": t.end, "label": t.label, "score": t.score,
                               "text": inputs[i][t.start:t.end] if inputs else ""}
                              for t in reply.tokens[i]]
        if reply.similarity is not None:
            item["similarity"] = reply.similarity[i]
        if reply.embeddings is not None:
            item["embedding"] = reply.embeddings[i].tolist()
        data.append(item)
    return {"object": "list", "model": model, "version": reply.version, "data": data,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}


def images(body: dict) -> list[bytes]:
    """`images`: a non-empty list of base64 strings or data: URLs of encoded images."""
    value = body.get("images")
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise bad_request("`images` must be a non-empty list of base64 strings or data: URLs",
                          "images")
    out = []
    for i, v in enumerate(value):
        if v.startswith("data:"):
            v = v.partition(",")[2]
        try:
            out.append(base64.b64decode(v, validate=True))
        except (binascii.Error, ValueError):
            raise bad_request(f"images[{i}] is not valid base64", "images") from None
    return out


def series(body: dict) -> np.ndarray:
    """`series`: one series [v, ...] or several [[v, ...], ...] (null = missing, oldest first;
    pad shorter ones on the left with null) -> float32 (n, T)."""
    value = body.get("series")
    rows = [value] if isinstance(value, list) and value and not isinstance(value[0], list) \
        else value
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, list) and r and len(r) == len(rows[0]) for r in rows):
        raise bad_request("`series` must be a list of numbers or a list of equally long lists",
                          "series")
    try:
        return np.asarray([[np.nan if v is None else float(v) for v in r] for r in rows],
                          np.float32)
    except (TypeError, ValueError):
        raise bad_request("`series` values must be numbers or null", "series") from None


def forecast(reply: ForecastReply, model: str) -> dict:
    """forecast[i][t][k]: series i, step t + 1, quantile quantiles[k]."""
    return {"object": "forecast", "model": model, "version": reply.version,
            "quantiles": reply.quantiles,
            "data": [{"index": i, "truncated": reply.truncated[i],
                      "forecast": reply.forecast[i].tolist()}
                     for i in range(len(reply.truncated))]}

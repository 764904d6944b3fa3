"""The gateway's endpoints (docs/gateway.md). Each one: authenticate (the API key's owner), read the
JSON body (bounded), find the owner's task (404 otherwise), call it with fmplex.AsyncClient, answer
in OpenAI's shape. Every failure is an ApiError (errors.py); nothing else escapes as a bare 500.

A client that disconnects is noticed while its request is served: a non-streaming call is
cancelled (a generation's CancelRequest reaches the task, whose daemon frees the sequence's KV at
once); a stream is cancelled by Starlette when the connection drops, and closing the fmplex stream
sends the CancelRequest.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
from typing import Awaitable

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from fmplex.gateway import openai_format as fmt
from fmplex.gateway.errors import ApiError, bad_request, from_fmplex, model_not_found
from ipc.errors import FmplexError
from ipc.messages import Family, GenerateReply, TextDelta

log = logging.getLogger("fmplex.gateway")


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def endpoint(fn):
    """Wrap a handler: ApiError -> its response; a vanished client -> nothing to answer; anything
    unforeseen -> 500 (logged)."""
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as e:
            return e.response()
        except FmplexError as e:              # the daemon's control socket (listing the tasks)
            return from_fmplex(e, "").response()
        except ClientGone:
            return Response(status_code=499)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return ApiError(500, "internal error in the gateway", "internal").response()
    handler.__name__ = fn.__name__
    return handler


# ------------------------------------------------------------------ request plumbing

def owner_of(request: Request) -> int:
    """The caller's owner uid: its API key's, or (no keys file) the gateway's own."""
    keys = request.app.state.keys
    if keys is None:
        return os.getuid()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "You didn't provide an API key (Authorization: Bearer KEY).",
                       "invalid_api_key")
    owner = keys.owner(token.strip())
    if owner is None:
        raise ApiError(401, "Incorrect API key provided.", "invalid_api_key")
    return owner


async def read_json(request: Request) -> dict:
    """The body as a JSON object: 413 beyond the size limit (declared or streamed), 400 if it is
    not JSON or not an object."""
    limit = request.app.state.max_body
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds {limit}", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", "body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"could not parse the JSON body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the JSON body must be an object")
    return body


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, model: str, call: Awaitable):
    """Await an fmplex call; if the client disconnects first, cancel it and raise ClientGone.
    fmplex errors become ApiErrors."""
    work = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work not in done:
        log.info("client of %s went away; its request was cancelled", model)
        raise ClientGone()
    try:
        return work.result()
    except FmplexError as e:
        raise from_fmplex(e, model) from None


async def prepare(request: Request, family: Family):
    """Authenticate, read the body, find the owner's task of `family`: (body, model)."""
    owner = owner_of(request)
    body = await read_json(request)
    task = await request.app.state.catalog.require(owner, body.get("model"), family)
    return body, task.name


# ------------------------------------------------------------------ models

def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _model(t) -> dict:
    return {"id": t.name, "object": "model", "created": 0, "owned_by": _owner_name(t.owner_uid),
            "fmplex": {"family": t.family.value, "backbone": t.backbone, "state": t.state.value,
                       "version": t.version}}


@endpoint
async def list_models(request: Request) -> Response:
    tasks = await request.app.state.catalog.tasks(owner_of(request))
    return JSONResponse({"object": "list", "data": [_model(t) for t in tasks]})


@endpoint
async def get_model(request: Request) -> Response:
    name = request.path_params["model"]
    tasks = await request.app.state.catalog.tasks(owner_of(request), fresh=True)
    task = next((t for t in tasks if t.name == name), None)
    if task is None:
        raise model_not_found(name)
    return JSONResponse(_model(task))


# ------------------------------------------------------------------ generation

@endpoint
async def chat_completions(request: Request) -> Response:
    body, model = await prepare(request, Family.DECODER)
    return await _generate(request, body, model, {"messages": fmt.chat_messages(body)}, chat=True)


@endpoint
async def completions(request: Request) -> Response:
    body, model = await prepare(request, Family.DECODER)
    return await _generate(request, body, model, {"prompt": fmt.completion_prompt(body)},
                           chat=False)


async def _generate(request: Request, body: dict, model: str, prompt: dict, chat: bool):
    state = request.app.state
    sampling, stream, include_usage, timeout_s = fmt.generation(body, state.timeout_s)
    rid = fmt.new_id("chatcmpl" if chat else "cmpl")
    if not stream:
        reply = await unless_gone(request, model, state.client.generate(
            model, timeout_s=timeout_s, **prompt, **sampling))
        return JSONResponse(fmt.chat_completion(reply, rid, model) if chat
                            else fmt.completion(reply, rid, model))
    parts = state.client.stream(model, timeout_s=timeout_s, **prompt, **sampling)
    try:
        first = await unless_gone(request, model, parts.__anext__())   # errors keep their status
    except BaseException:
        await parts.aclose()
        raise
    return StreamingResponse(_events(parts, first, rid, model, chat, include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _events(parts, first, rid: str, model: str, chat: bool, include_usage: bool):
    """SSE as OpenAI streams it: the chunks, a usage chunk if asked for, then [DONE]. A failure
    after the stream began is an `error` object in the stream (OpenAI's clients raise it)."""
    created, done = fmt.now(), False

    def chunk(text: str | None, reason: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else \
                ({} if text is None else {"content": text})
            return fmt.chat_chunk(rid, model, created, delta, reason, include_usage)
        return fmt.completion_chunk(rid, model, created, text or "", reason, include_usage)
    try:
        if chat:
            yield _sse(chunk(None, None, role=True))
        part = first
        while True:
            if isinstance(part, TextDelta):
                if part.text:
                    yield _sse(chunk(part.text, None))
            elif isinstance(part, GenerateReply):
                done = True
                last = chunk(None, fmt.finish(part.finish_reason))
                yield _sse(last)
                if include_usage:
                    yield _sse(fmt.usage_chunk(last, part))
                yield "data: [DONE]\n\n"
                return
            part = await parts.__anext__()
    except FmplexError as e:
        done = True
        yield _sse(from_fmplex(e, model).body())
    finally:
        if not done:                  # the client went away (Starlette cancelled us): stop it
            with anyio.CancelScope(shield=True):
                await parts.aclose()
            log.info("client of %s went away mid-stream; its generation was cancelled", model)


# ------------------------------------------------------------------ one-forward tasks

@endpoint
async def embeddings(request: Request) -> Response:
    body, model = await prepare(request, Family.TEXT_ENCODER)
    inputs, encoding = fmt.texts(body), fmt.encoding_format(body)
    state = request.app.state
    reply = await unless_gone(request, model, state.client.infer(
        model, inputs, timeout_s=fmt.timeout(body, state.timeout_s)))
    if reply.embeddings is None:
        raise bad_request(f"model {model} is not a text-embedding task: use "
                          "/v1/fmplex/classifications", "model")
    return JSONResponse(fmt.embeddings(reply, model, encoding))


@endpoint
async def classifications(request: Request) -> Response:
    body, model = await prepare(request, Family.TEXT_ENCODER)
    inputs = fmt.texts(body)
    pairs = fmt.texts(body, "pairs") if body.get("pairs") is not None else None
    top_k = fmt.ranged(body, "top_k", 0, 4096) or 0
    state = request.app.state
    reply = await unless_gone(request, model, state.client.infer(
        model, inputs, pairs, top_k=top_k, timeout_s=fmt.timeout(body, state.timeout_s)))
    if reply.embeddings is not None:
        raise bad_request(f"model {model} is a text-embedding task: use /v1/embeddings", "model")
    return JSONResponse(fmt.labelled(reply, model, inputs))


@endpoint
async def images(request: Request) -> Response:
    body, model = await prepare(request, Family.VISION)
    top_k = fmt.ranged(body, "top_k", 0, 4096) or 0
    state = request.app.state
    reply = await unless_gone(request, model, state.client.infer_images(
        model, fmt.images(body), top_k=top_k, timeout_s=fmt.timeout(body, state.timeout_s)))
    return JSONResponse(fmt.labelled(reply, model))


@endpoint
async def forecasts(request: Request) -> Response:
    body, model = await prepare(request, Family.TIME_SERIES)
    horizon = fmt.ranged(body, "horizon", 0, 4096) or 0
    quantiles = body.get("quantiles")
    if quantiles is not None and not (isinstance(quantiles, list) and all(
            isinstance(q, (int, float)) and not isinstance(q, bool) for q in quantiles)):
        raise bad_request("`quantiles` must be a list of numbers", "quantiles")
    top_k = fmt.ranged(body, "top_k", 0, 4096) or 0
    state = request.app.state
    reply = await unless_gone(request, model, state.client.infer_series(
        model, fmt.series(body), horizon=horizon, quantiles=quantiles, top_k=top_k,
        timeout_s=fmt.timeout(body, state.timeout_s)))
    if hasattr(reply, "forecast"):
        return JSONResponse(fmt.forecast(reply, model))
    return JSONResponse(fmt.labelled(reply, model))

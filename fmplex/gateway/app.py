"""The gateway's Starlette app: its routes, OpenAI-shaped errors for unknown paths and methods, and
one fmplex.AsyncClient for its lifetime (opened and closed by the app's lifespan).

Why Starlette + uvicorn: the ASGI toolkit under FastAPI and the reference ASGI server, both small
(starlette needs only anyio) and well kept; the gateway validates its own fields (to answer in
OpenAI's error shape), so a schema layer (FastAPI's pydantic models) would add weight and no checks;
StreamingResponse gives server-sent events and cancels the stream when the client disconnects.
"""
from __future__ import annotations

import contextlib
import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from fmplex.client import AsyncClient
from fmplex.gateway import routes
from fmplex.gateway.catalog import Catalog
from fmplex.gateway.errors import ApiError
from fmplex.gateway.keys import ApiKeys

log = logging.getLogger("fmplex.gateway")
MAX_BODY_BYTES = 32 << 20        # default bound of a request body (images travel base64)
TIMEOUT_S = 300.0                # default deadline of a request (a request may set timeout_ms)


def create_app(run_dir: str | None = None, keys: ApiKeys | None = None,
               max_body: int = MAX_BODY_BYTES, timeout_s: float = TIMEOUT_S,
               on_ready=None) -> Starlette:
    """The ASGI app. `keys` None: every caller is the gateway's own uid (loopback only, see
    server.py). `on_ready()` is called once the fmplex client is open."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        client = AsyncClient(run_dir, timeout_s=timeout_s)
        app.state.client, app.state.catalog = client, Catalog(client)
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await client.close()

    async def http_error(request, exc: HTTPException):
        return ApiError(exc.status_code, exc.detail or "not found", None).response()

    app = Starlette(routes=[
        Route("/v1/models", routes.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", routes.get_model, methods=["GET"]),
        Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
        Route("/v1/completions", routes.completions, methods=["POST"]),
        Route("/v1/embeddings", routes.embeddings, methods=["POST"]),
        Route("/v1/fmplex/classifications", routes.classifications, methods=["POST"]),
        Route("/v1/fmplex/images", routes.images, methods=["POST"]),
        Route("/v1/fmplex/forecasts", routes.forecasts, methods=["POST"]),
    ], exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.keys, app.state.max_body, app.state.timeout_s = keys, max_body, timeout_s
    return app

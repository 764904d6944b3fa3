"""`fmplex gateway`: an OpenAI-compatible HTTP gateway in front of fmplex tasks.

    fmplex gateway --listen 127.0.0.1:8000 [--api-keys FILE]

An ASGI app (Starlette, served by uvicorn) that talks to each task's own endpoint with
`fmplex.AsyncClient`; `model` is the task's name. ZeroMQ stays fmplex's native wire: the gateway
is a client like any other, with the gateway's uid (fmplexd's listings and the endpoints' ZAP
rule apply to it), and it adds its own rule: an API key reaches only its owner's tasks.

    GET  /v1/models                      the tasks the caller may use
    POST /v1/embeddings                  text-embedding tasks (input: string or list)
    POST /v1/chat/completions            text-generation tasks (SSE streaming as OpenAI's)
    POST /v1/completions                 text-generation tasks, raw prompt
    POST /v1/fmplex/classifications      text-classification, token-classification,
                                         sentence-similarity tasks
    POST /v1/fmplex/images               image-classification / image-embedding tasks
    POST /v1/fmplex/forecasts            time-series forecasting / classification tasks

Modules: keys.py (API keys -> owners), catalog.py (the owner's tasks), errors.py (fmplex errors ->
OpenAI error bodies and statuses), openai_format.py (requests in, responses and chunks out),
routes.py (the endpoints), app.py (the Starlette app), server.py (listening: loopback only
without a keys file). docs/gateway.md documents every path, field and status.
"""

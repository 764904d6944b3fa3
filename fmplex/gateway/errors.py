"""Errors as OpenAI's clients expect them: an HTTP status and the body
{"error": {"message", "type", "param", "code"}}.

    400 invalid_request_error   bad JSON, bad fields, input the task refuses (invalid_input,
                                oversized, bad_message, ...)
    401 invalid_request_error   code invalid_api_key: no key, or not a key of the keys file
    404 invalid_request_error   code model_not_found: no such task, or another owner's (the two
                                are not told apart)
    413 invalid_request_error   code body_too_large
    429 rate_limit_error        code overloaded, with Retry-After
    503 service_unavailable     task_unavailable, daemon_unavailable, shutting_down
    504 timeout_error           the request's deadline passed (timeout)
    500 server_error            internal, or anything unforeseen
"""
from __future__ import annotations

from starlette.responses import JSONResponse

from ipc.errors import ErrorCode, FmplexError

RETRY_AFTER_S = 1

_STATUS = {
    ErrorCode.UNKNOWN_TASK: 404, ErrorCode.UNAUTHORIZED: 404,
    ErrorCode.OVERLOADED: 429, ErrorCode.TIMEOUT: 504,
    ErrorCode.TASK_UNAVAILABLE: 503, ErrorCode.DAEMON_UNAVAILABLE: 503,
    ErrorCode.SHUTTING_DOWN: 503, ErrorCode.STALE_EPOCH: 503, ErrorCode.NOT_REGISTERED: 503,
    ErrorCode.CONFLICT: 409, ErrorCode.INTERNAL: 500, ErrorCode.TOO_LARGE: 413,
}
_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "service_unavailable", 504: "timeout_error"}


class ApiError(Exception):
    """An error the gateway answers with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request", param)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    "model_not_found", "model")


def from_fmplex(e: FmplexError, model: str) -> ApiError:
    """The ApiError for an fmplex error on a request to task `model`."""
    status = _STATUS.get(e.code, 400)
    if status == 404:
        return model_not_found(model)
    return ApiError(status, e.message, e.code.value)

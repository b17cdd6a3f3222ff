"""Errors in TGI's shape, `{"error": str, "error_type": str}`; /v1 routes use OpenAI's shape,
/v1/messages Anthropic's (`{"type": "error", "error": {"type", "message"}}`), the Ollama routes
(/api/*) Ollama's, `{"error": str}`, and vLLM-dialect `/tokenize` requests vLLM's
(`{"error": {"message", "type", "param", "code"}}`, vLLM 0.32's `ErrorResponse`; see `mark_vllm`)."""

import logging
import math
import os
from collections.abc import Mapping
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.content_type import ORIGINAL_KEY
from app.engine.core.admission import RequestTooLargeError
from app.engine.core.types import EngineUnavailableError, QueueFullError
from app.engine.models.lora import UnknownAdapterError

log = logging.getLogger("textgen")


# Seconds a 503 asks the client to wait (`Retry-After`) when no better estimate is known: about
# how long loading a small model takes, short enough that a client does not wait long past ready.
RETRY_AFTER_S = 5


class APIError(Exception):
    """An error answered in the route family's shape. `retry_after` (seconds, 503 only): the wait
    the `Retry-After` header asks for; None gives RETRY_AFTER_S."""

    def __init__(
        self, status: int, message: str, error_type: str, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.retry_after = retry_after


def validation(message: str, param: str | None = None) -> APIError:
    return APIError(422, message, "validation", param)


def from_engine(exc: Exception) -> APIError:
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "overloaded")
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), "unavailable")
    if isinstance(exc, UnknownAdapterError):  # TGI routes turn this into their 422
        return APIError(404, str(exc), "model_not_found", "model")
    if isinstance(exc, RequestTooLargeError):
        return APIError(413, str(exc), "payload_too_large", "max_new_tokens")
    return APIError(500, str(exc), "generation")


OPENAI_TYPES = {
    "validation": "invalid_request_error",
    "overloaded": "rate_limit_exceeded",
    "unavailable": "service_unavailable",
    "timeout": "timeout",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "model_not_found": "invalid_request_error",
    "payload_too_large": "invalid_request_error",
    "permission": "permission_error",
    "conflict": "invalid_request_error",
}


# Anthropic's error types (docs.anthropic.com, "Errors"); anything else is its catch-all `api_error`.
ANTHROPIC_TYPES = {
    "validation": "invalid_request_error",
    "method_not_allowed": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "model_not_found": "not_found_error",
    "not_found": "not_found_error",
    "payload_too_large": "request_too_large",
    "overloaded": "rate_limit_error",
    "unavailable": "overloaded_error",
    "timeout": "timeout_error",
}


def is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_body(err: APIError) -> dict[str, object]:
    return {
        "type": "error",
        "error": {"type": ANTHROPIC_TYPES.get(err.error_type, "api_error"), "message": err.message},
    }


# Set in the request's scope by a route that told the request is in vLLM's dialect (e.g. /tokenize
# with `prompt`), before anything can fail, so every error of that request is in vLLM's shape.
VLLM_KEY = "textgen.vllm_dialect"


def mark_vllm(request: Request) -> None:
    """Answer this request's errors in vLLM's shape."""
    request.scope[VLLM_KEY] = True


def vllm_body(status: int, err: APIError) -> dict[str, object]:
    """vLLM's ErrorResponse (vLLM 0.32, `entrypoints/serve/engine/protocol.py`: `{"error": ErrorInfo}`):
    `type` is the status's name as an exception (`BadRequestError`, `NotFoundError`, ...), `code` the
    HTTP status. (Older vLLM releases answered the same fields flat, with `"object": "error"`.)"""
    name = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    return {"error": {"message": err.message, "type": f"{name}Error", "param": err.param, "code": status}}


def is_ollama(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def retry_after(seconds: float | None) -> dict[str, str]:
    """The `Retry-After` header (whole seconds, at least 1; RFC 9110 section 10.2.3) for a 503."""
    return {"Retry-After": str(max(1, math.ceil(RETRY_AFTER_S if seconds is None else seconds)))}


def error_response(request: Request, err: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    if err.status == 503:
        # Every route family's 503 says when to come back (the official SDKs wait that long).
        headers = {**retry_after(err.retry_after), **(headers or {})}
    if request.scope.get(VLLM_KEY):
        # vLLM answers invalid requests (its validation errors included) with 400.
        status = 400 if err.status == 422 else err.status
        return JSONResponse(vllm_body(status, err), status_code=status, headers=headers)
    if is_anthropic(request.url.path):
        # Anthropic, like OpenAI, answers invalid requests with 400 (its SDK raises BadRequestError).
        return JSONResponse(anthropic_body(err), status_code=400 if err.status == 422 else err.status, headers=headers)
    if is_ollama(request):
        # Ollama answers bad requests with 400 and only an `error` string (its clients read that).
        return JSONResponse(
            {"error": err.message}, status_code=400 if err.status == 422 else err.status, headers=headers
        )
    if is_openai(request):
        # OpenAI answers invalid requests with 400 (its SDK raises BadRequestError), not 422.
        status = 400 if err.status == 422 else err.status
        code = err.error_type if err.error_type not in ("validation",) else None
        body: dict[str, object] = {
            "error": {
                "message": err.message,
                "type": OPENAI_TYPES.get(err.error_type, err.error_type),
                "param": err.param,
                "code": code,
            }
        }
        return JSONResponse(body, status_code=status, headers=headers)
    body = {"error": err.message, "error_type": err.error_type}
    return JSONResponse(body, status_code=err.status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    locs = []
    for error in exc.errors():
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        locs.append(loc)
        parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    # A value that fits none of a union's types gets one error per type, each loc ending in that
    # type's name (`input.str`, `input.list[...]`): the field the client sent is their common prefix.
    common = os.path.commonprefix(locs) if len(locs) > 1 else []
    union = bool(common) and all(len(loc) == len(common) + 1 for loc in locs)
    param = ".".join(common if union else locs[0] if locs else []) or "body"
    return ("Input validation error: " + "; ".join(parts)), param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            sent = request.scope.get(ORIGINAL_KEY)
            was = f" (Content-Type was {sent})" if sent else ""
            message = (
                f"the body is not valid JSON{was}: send a JSON body with `Content-Type: application/json`. {message}"
            )
        return error_response(request, validation(message, param))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: still answer in the documented shape, and log the traceback.
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request, APIError(500, f"internal error: {type(exc).__name__}", "internal"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http")
        return error_response(request, APIError(exc.status_code, str(exc.detail), kind), exc.headers)

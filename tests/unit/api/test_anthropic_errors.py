"""Errors on /v1/messages come in Anthropic's shape with its status codes and types, whatever
raised them (validation, the engine's queue, timeouts); other routes keep their own shapes."""

import json

import pytest
from starlette.requests import Request

from app.api.errors import APIError, error_response, from_engine
from app.engine.core.types import EngineUnavailableError, QueueFullError


def request(path: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""})


@pytest.mark.parametrize(
    ("err", "status", "kind"),
    [
        (APIError(422, "bad `max_tokens`", "validation", "max_tokens"), 400, "invalid_request_error"),
        (APIError(401, "missing key", "authentication"), 401, "authentication_error"),
        (APIError(404, "no model `x`", "model_not_found", "model"), 404, "not_found_error"),
        (APIError(413, "too big", "payload_too_large"), 413, "request_too_large"),
        (from_engine(QueueFullError("queue is full")), 429, "rate_limit_error"),
        (from_engine(EngineUnavailableError("draining")), 503, "overloaded_error"),
        (APIError(504, "timed out", "timeout"), 504, "timeout_error"),
        (APIError(500, "internal error: KeyError", "internal"), 500, "api_error"),
    ],
)
def test_anthropic_shape(err: APIError, status: int, kind: str) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = error_response(request(path), err)
        assert response.status_code == status
        assert json.loads(response.body) == {"type": "error", "error": {"type": kind, "message": err.message}}


def test_other_routes_keep_their_shapes() -> None:
    err = APIError(422, "bad", "validation", "x")
    assert set(json.loads(error_response(request("/v1/messagesx"), err).body)["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert json.loads(error_response(request("/generate"), err).body) == {"error": "bad", "error_type": "validation"}

"""Pure ASGI middleware (BaseHTTPMiddleware would break streaming disconnect detection):
request ids, metrics and the JSON access log; the body-size limit; API-key auth."""

import hmac
import json
import logging
import time
import uuid

from starlette.requests import Request
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import ui
from app.api.errors import APIError, error_response, is_anthropic
from app.metrics import Metrics

access_log = logging.getLogger("textgen.access")

USAGE_KEY = "textgen.usage"
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before the response
REQUEST_ID_KEY = "textgen.request_id"
_SAFE_ID = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def _route_label(router: Router, scope: Scope) -> str:
    """Route templates, not raw paths, so unknown URLs cannot blow up label cardinality."""
    route = scope.get("route")
    if route is not None:
        return route.path
    for candidate in router.routes:
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return getattr(candidate, "path", "unmatched")
    return "unmatched"


class Observability:
    """Accepts or creates X-Request-ID (echoed back), counts and times requests by route and
    status, and writes one JSON access line per request. Prompts and outputs are logged only
    with TEXTGEN_LOG_PROMPTS=true. A client that disconnects before the response is complete is
    recorded as 499, as nginx does, whatever the route then tried to send."""

    def __init__(self, app: ASGIApp, metrics: Metrics, router: Router, log_prompts: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if given and len(given) <= 128 and set(given) <= _SAFE_ID else uuid.uuid4().hex
        usage: dict = scope.setdefault(USAGE_KEY, {})
        scope[REQUEST_ID_KEY] = request_id
        status = 500
        complete = disconnected = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def receive_wrapper() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                disconnected = True
            return message

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            if disconnected:
                status = CLIENT_CLOSED
            elapsed = time.perf_counter() - start
            label = _route_label(self.router, scope)
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_duration.labels(label).observe(elapsed)
            self._log(scope, request_id, label, status, elapsed, usage)

    def _log(self, scope: Scope, request_id: str, route: str, status: int, elapsed: float, usage: dict) -> None:
        if route in ("/health", "/ready", "/metrics") and status in (200, 503):
            # Probes and scrapes would drown everything else, also while the model loads or builds (the
            # playground polls /health then); a failed engine is logged where it fails.
            return
        line = {
            "ts": round(time.time(), 3),
            "request_id": request_id,
            "method": scope["method"],
            "route": route,
            "status": status,
            "total_time": round(elapsed, 4),
        }
        if "generated_tokens" in usage:
            line.update(
                prompt_tokens=usage["prompt_tokens"],
                generated_tokens=usage["generated_tokens"],
                queue_time=round(usage["queue_time"], 4),
                finish_reason=usage["finish_reasons"][0]
                if len(usage["finish_reasons"]) == 1
                else usage["finish_reasons"],
            )
        line.update(usage.get("log_fields", {}))  # caller-given identifiers (e.g. safety_identifier)
        if self.log_prompts:
            line.update(prompt=usage.get("prompt"), output=usage.get("outputs"))
        access_log.info(json.dumps(line, ensure_ascii=False))


class BodyLimit:
    """413 for bodies over TEXTGEN_MAX_BODY_BYTES, by Content-Length, or, for chunked uploads,
    by reading the body here first (bounded), before any route parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while uploading
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(
            413, f"request body is larger than {self.max_bytes} bytes (TEXTGEN_MAX_BODY_BYTES)", "payload_too_large"
        )
        await error_response(Request(scope, receive), err)(scope, receive, send)


OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class APIKeyAuth:
    """`Authorization: Bearer <key>` on every route but the probes, the docs, the playground page
    (GET / and /ui/) and /metrics (unless TEXTGEN_METRICS_REQUIRE_KEY); on Anthropic's /v1/messages
    routes `x-api-key: <key>` too (what the anthropic SDK sends). Keys are compared in constant time."""

    def __init__(self, app: ASGIApp, keys: list[str], metrics_require_key: bool = False) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = OPEN_PATHS if metrics_require_key else OPEN_PATHS | {"/metrics"}

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, bearer = headers.get(b"authorization", b"").partition(b" ")
        tokens = [bearer.strip()] if scheme.lower() == b"bearer" and bearer.strip() else []
        if is_anthropic(scope["path"]) and headers.get(b"x-api-key", b"").strip():
            tokens.append(headers[b"x-api-key"].strip())
        # Compare against every key so timing does not reveal which (or whether one) matched.
        matches = [hmac.compare_digest(token, key) for token in tokens for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] == "OPTIONS"
            or scope["path"] in self.open_paths
            or ui.is_open(scope["method"], scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        if self._authorized(scope):
            await self.app(scope, receive, send)
            return
        how = "`x-api-key: <key>` or `Authorization: Bearer <key>`" if is_anthropic(scope["path"]) else None
        err = APIError(
            401, f"missing or invalid API key: send {how or '`Authorization: Bearer <key>`'}", "authentication"
        )
        response = error_response(Request(scope, receive), err, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

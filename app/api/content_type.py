"""Accept a JSON body whatever its Content-Type (plain `curl -d` sends form encoding), as
TGI and vLLM users expect; a body that is not JSON gets an error saying to send
`Content-Type: application/json`."""

from starlette.types import ASGIApp, Receive, Scope, Send

ORIGINAL_KEY = "textgen.content_type"


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class JSONBody:
    """Pure ASGI: on requests with a body, a non-JSON Content-Type is replaced by
    application/json (the original is kept in the scope for error messages)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            original = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            if not is_json(original):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
                scope[ORIGINAL_KEY] = original or "(none)"
        await self.app(scope, receive, send)

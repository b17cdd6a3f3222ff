"""The browser playground: GET / (the page) and /ui/* (its static files, shipped in the package).

The page is a plain client of the public API (/info, /health, /v1/completions,
/v1/chat/completions); it needs no key to load, and sends the user's key with each API call.
TEXTGEN_UI=false leaves both routes out.
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "ui"
UI_PREFIX = "/ui"


def mount(app: FastAPI) -> None:
    """Add GET / and the /ui/ static files to `app`."""

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        # no-cache: revalidate (ETag) so an upgraded server never runs an old page against a new API.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount(UI_PREFIX, StaticFiles(directory=STATIC_DIR), name="ui")


def is_open(method: str, path: str) -> bool:
    """The page and its files load without an API key (they hold no data); the API calls need it."""
    return method in ("GET", "HEAD") and (path == "/" or path.startswith(UI_PREFIX + "/"))

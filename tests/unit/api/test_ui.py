"""The playground's routes in-process: served at / and /ui/, open without a key, off with TEXTGEN_UI=false,
and every static file is package data (so an installed wheel has it)."""

import fnmatch
import tomllib
from pathlib import Path

from fastapi.testclient import TestClient

from app.api.ui import STATIC_DIR
from app.config import Settings
from app.main import create_app

ROOT = Path(__file__).resolve().parents[3]


def client(**settings: object) -> TestClient:
    # Not entered as a context manager: the lifespan (model loading) does not run.
    return TestClient(create_app(Settings(model="unused", **settings)))


def test_page_and_static_files() -> None:
    c = client()
    page = c.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>textgen playground</title>" in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = c.get(f"/ui/{name}")
        assert r.status_code == 200
        assert kind in r.headers["content-type"]
    assert c.get("/ui/missing.js").status_code == 404


def test_open_without_key_but_api_is_not() -> None:
    c = client(api_key="sesame")
    assert c.get("/").status_code == 200
    assert c.get("/ui/app.js").status_code == 200
    assert c.post("/", json={"inputs": "hi"}).status_code == 401  # TGI's POST / stays protected
    assert c.get("/info").status_code == 401


def test_off() -> None:
    c = client(ui=False)
    assert c.get("/").status_code == 405  # only TGI's POST / is left
    assert c.get("/ui/app.js").status_code == 404


def test_static_files_are_package_data() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    files = [p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.iterdir() if p.is_file()]
    assert files
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"{f} would be missing from an installed package"

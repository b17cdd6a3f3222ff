"""TEXTGEN_API_KEY: no key / wrong key / right key on each route family."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import run_server

PROTECTED = [
    ("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}, "tgi"),
    ("POST", "/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}, "tgi"),
    ("POST", "/", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}, "tgi"),
    ("POST", "/embed", {"inputs": "hi"}, "tgi"),
    ("POST", "/tokenize", {"inputs": "hi"}, "tgi"),
    ("POST", "/detokenize", {"tokens": [1, 2]}, "tgi"),
    ("POST", "/tokenize", {"prompt": "hi"}, "tgi"),
    ("GET", "/tokenizer_info", None, "tgi"),
    ("GET", "/info", None, "tgi"),
    ("GET", "/v1/models", None, "openai"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}, "openai"),
    ("POST", "/v1/embeddings", {"model": "m", "input": "hi"}, "openai"),
]


@pytest.fixture(scope="module")
def url(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# rotated weekly\nfile-key\n")
    env = {
        "TEXTGEN_API_KEY": "key-one,key-two",
        "TEXTGEN_API_KEY_FILE": str(key_file),
        "TEXTGEN_SERVED_MODEL_NAME": "m",
    }
    with run_server(tiny_gpt2_dir, env=env) as base:
        yield base


def call(url: str, method: str, path: str, body: dict | None, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(("method", "path", "body", "family"), PROTECTED)
def test_protected_routes(url: str, method: str, path: str, body: dict | None, family: str) -> None:
    for key in (None, "wrong"):
        r = call(url, method, path, body, key)
        assert r.status_code == 401, (path, key)
        if family == "openai":
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        else:
            assert r.json()["error_type"] == "authentication"
    for key in ("key-one", "key-two", "file-key"):
        assert call(url, method, path, body, key).status_code == 200, (path, key)


def test_open_routes(url: str) -> None:
    for path in ("/health", "/ready", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(url + path).status_code == 200, path


def test_metrics_can_require_the_key(tiny_gpt2_dir: Path) -> None:
    env = {"TEXTGEN_API_KEY": "k", "TEXTGEN_METRICS_REQUIRE_KEY": "true"}
    with run_server(tiny_gpt2_dir, env=env) as url:
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200

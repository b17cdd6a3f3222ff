"""Hand a trained LoRA adapter to a running `textgen serve`: POST /v1/load_lora_adapter (vLLM's route).

Uses the standard library's HTTP client: one request does not justify a dependency. The server's
API key, when it has one, is read from TEXTGEN_API_KEY (its first key), never from a flag.
"""

import json
import os
import shlex
import urllib.error
import urllib.request
from pathlib import Path

from app.finetune.config import ConfigError


def load_request(name: str, path: Path) -> dict[str, str]:
    return {"lora_name": name, "lora_path": str(path.resolve())}


def curl_command(name: str, path: Path, server: str = "http://127.0.0.1:8000") -> str:
    """The one-line curl that loads the adapter at `path` as `name` into the server at `server`."""
    body = json.dumps(load_request(name, path))
    key = ' -H "Authorization: Bearer $TEXTGEN_API_KEY"' if os.environ.get("TEXTGEN_API_KEY") else ""
    return (
        f"curl -sS -X POST {server.rstrip('/')}/v1/load_lora_adapter -H 'Content-Type: application/json'{key} "
        f"-d {shlex.quote(body)}"
    )


def serve_to(server: str, name: str, path: Path, timeout: float = 120.0) -> str:
    """Load the adapter at `path` into the running server at `server` under `name`; returns the
    server's answer. Raises ConfigError with the server's error (wrong base, rank, name taken,
    runtime loading disabled, path outside its TEXTGEN_LORA_ROOT) or the connection failure."""
    headers = {"Content-Type": "application/json"}
    key = next((k.strip() for k in os.environ.get("TEXTGEN_API_KEY", "").split(",") if k.strip()), None)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = f"{server.rstrip('/')}/v1/load_lora_adapter"
    data = json.dumps(load_request(name, path)).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # an http(s) URL: --serve-to is checked
            return response.read().decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ConfigError(
            f"the adapter was saved to {path}, but {url} refused to load it ({exc.code}): {detail}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"the adapter was saved to {path}, but {url} could not be reached: {exc}") from None

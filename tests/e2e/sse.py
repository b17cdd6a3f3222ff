"""Read server-sent events the way a client does."""

import json
from collections.abc import Iterator

import httpx


def events(response: httpx.Response) -> Iterator[dict]:
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import Server, start, stop


@pytest.fixture(scope="session")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One shared server on the tiny GPT-2 for tests that don't need special settings."""
    srv = start(tiny_gpt2_dir, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop(srv.process)


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c

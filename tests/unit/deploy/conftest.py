"""Shared readers for the deployment files (Dockerfile, compose, Kubernetes, Prometheus, Grafana)."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
K8S_DIR = ROOT / "deploy" / "k8s"

# The service's settings (contract): every TEXTGEN_* variable a deployment file may set.
TEXTGEN_SETTINGS = {
    "TEXTGEN_" + name
    for name in (
        "MODEL HOST PORT DEVICE DTYPE MAX_INPUT_TOKENS MAX_TOTAL_TOKENS MAX_BATCH_SIZE MAX_BATCH_TOKENS "
        "MAX_QUEUE API_KEY API_KEY_FILE METRICS_REQUIRE_KEY REQUEST_TIMEOUT SHUTDOWN_TIMEOUT CORS_ORIGINS "
        "LOG_PROMPTS EMBEDDING_MODEL CHAT_TEMPLATE ADAPTER DRAIN_DELAY OTLP_ENDPOINT"
    ).split()
}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            keyword, _, args = buf.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        buf = ""
    return instructions


def parse_duration(value: str | int | float) -> float:
    """Seconds in a compose duration ("1m30s", "600s", 45)."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="session")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def compose_gpu() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "compose.gpu.yml").read_text())


@pytest.fixture(scope="session")
def k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


@pytest.fixture(scope="session")
def k8s(k8s_docs) -> dict[str, dict]:
    """Kind -> the one manifest of that kind."""
    by_kind: dict[str, dict] = {}
    for path, doc in k8s_docs:
        assert doc["kind"] not in by_kind, f"two {doc['kind']} manifests ({path.name})"
        by_kind[doc["kind"]] = doc
    return by_kind


def dockerfile_env(instructions) -> dict[str, str]:
    """ENV values of the last stage (KEY=VALUE form)."""
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    env: dict[str, str] = {}
    for keyword, args in instructions[last_from:]:
        if keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value
    return env

"""/health, /ready, /info and /metrics against a real server."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import Server


def samples(url: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_health_ready_info(client: httpx.Client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/ready").status_code == 200
    info = client.get("/info").json()
    for key in (
        "model_id",
        "model_dtype",
        "model_device_type",
        "context_length",
        "max_input_tokens",
        "max_total_tokens",
        "max_batch_size",
        "version",
    ):
        assert key in info
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu"
    assert info["max_total_tokens"] <= info["context_length"] == 256


def test_metrics_parse_and_count(server: Server, client: httpx.Client) -> None:
    before = samples(server.url)
    client.post("/generate", json={"inputs": "The list", "parameters": {"max_new_tokens": 7, "min_new_tokens": 7}})
    client.post("/generate", json={"inputs": "", "parameters": {}})
    after = samples(server.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("textgen_requests_total", route="/generate", status="200") == 1
    assert delta("textgen_requests_total", route="/generate", status="422") == 1
    assert delta("textgen_generated_tokens_total") == 7
    assert delta("textgen_prompt_tokens_total") >= 1
    assert delta("textgen_finished_requests_total", finish_reason="length") == 1
    assert delta("textgen_time_to_first_token_seconds_count") == 1
    assert delta("textgen_inter_token_latency_seconds_count") == 6
    assert delta("textgen_request_duration_seconds_count", route="/generate") == 2
    for gauge in ("textgen_queue_size", "textgen_batch_size"):
        assert (gauge, ()) in after

"""The load gauges inference gateways read (vLLM's names) and textgen's own, parsed from /metrics
while the test holds requests open: the counts agree, KV-cache use rises and returns to 0."""

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import build_tiny_gpt2
from tests.e2e.server import run_server

BATCH = 2
HELD = 5  # 2 run, 3 wait
MODEL_NAME = "tiny"


@pytest.fixture(scope="module")
def long_context_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 2,048 positions: a request that generates 2,000 tokens stays in the batch for seconds.
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-2k"), n_positions=2048)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def load(samples: dict) -> dict[str, float]:
    model = (("model_name", MODEL_NAME),)
    return {
        "running": samples[("textgen_running_requests", ())],
        "waiting": samples[("textgen_waiting_requests", ())],
        "kv": samples[("textgen_kv_cache_usage_ratio", ())],
        "vllm_running": samples[("vllm:num_requests_running", model)],
        "vllm_waiting": samples[("vllm:num_requests_waiting", model)],
        "vllm_kv": samples[("vllm:kv_cache_usage_perc", model)],
        "vllm_gpu_kv": samples[("vllm:gpu_cache_usage_perc", model)],
    }


def test_gateway_metrics_follow_the_load(long_context_gpt2: Path) -> None:
    env = {"TEXTGEN_MAX_BATCH_SIZE": str(BATCH), "TEXTGEN_SERVED_MODEL_NAME": MODEL_NAME}
    body = {"inputs": "The list", "parameters": {"max_new_tokens": 2000, "min_new_tokens": 2000}}
    with run_server(long_context_gpt2, env=env) as url:
        idle = load(scrape(url))
        assert idle == dict.fromkeys(idle, 0.0)
        lora = [(labels, v) for (name, labels), v in scrape(url).items() if name == "vllm:lora_requests_info"]
        assert len(lora) == 1
        labels, stamp = lora[0]
        assert dict(labels) == {"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}
        assert abs(stamp - time.time()) < 60  # the value is the last update's Unix time

        clients = [httpx.Client(base_url=url, timeout=60) for _ in range(HELD)]
        streams = [c.stream("POST", "/generate_stream", json=body) for c in clients]
        try:
            for s in streams:
                s.__enter__()  # the request is sent; its response stays open until closed below
            deadline = time.monotonic() + 30
            while True:
                now = load(scrape(url))
                if now["running"] == BATCH and now["waiting"] == HELD - BATCH:
                    break
                assert time.monotonic() < deadline, now
                time.sleep(0.05)
            assert now["vllm_running"] == BATCH and now["vllm_waiting"] == HELD - BATCH
            assert 0 < now["kv"] <= 1
            assert now["vllm_kv"] == pytest.approx(now["kv"], abs=0.05)
            assert now["vllm_gpu_kv"] == pytest.approx(now["kv"], abs=0.05)
            first_kv = now["kv"]
            time.sleep(1.0)  # rows grow by a token per step inside buffers sized at admission
            later = load(scrape(url))
            assert later["running"] == BATCH and later["waiting"] == HELD - BATCH, later
            # The ratio counts allocated KV buffers (TEXTGEN_MAX_BATCH_TOKENS is a bound on memory),
            # which are sized for each row's reservation when it joins: steady while the rows run.
            assert later["kv"] >= first_kv > 0
        finally:
            for s, c in zip(streams, clients, strict=True):
                s.__exit__(None, None, None)  # the client leaves: the server cancels the request
                c.close()
        deadline = time.monotonic() + 30
        while (after := load(scrape(url))) != dict.fromkeys(after, 0.0):
            assert time.monotonic() < deadline, after
            time.sleep(0.05)

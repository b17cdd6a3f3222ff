"""Reading a running server's Prometheus metrics in end-to-end tests (parsed, not grepped)."""

import httpx
from prometheus_client.parser import text_string_to_metric_families


def gauge(url: str, name: str) -> float:
    """The value of sample `name` (a gauge, or a counter's `_total`) on the server at `url`."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def arrived(url: str) -> float:
    """Requests that reached the engine: running, waiting, or already finished (a fast engine may
    finish the first before the last arrive, so running + waiting alone may never reach them all)."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name in ("textgen_batch_size", "textgen_queue_size", "textgen_finished_requests_total"):
                total += sample.value
    return total

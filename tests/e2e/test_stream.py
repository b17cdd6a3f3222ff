"""POST /generate_stream: TGI's SSE shape, equality with /generate, and disconnects."""

import socket
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import Server
from tests.e2e.sse import events


def stream(client: httpx.Client, inputs: str, **parameters: object) -> list[dict]:
    with client.stream("POST", "/generate_stream", json={"inputs": inputs, "parameters": parameters}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(events(r))


def test_stream_shape_and_equality(client: httpx.Client) -> None:
    evs = stream(client, "The list", max_new_tokens=10, min_new_tokens=10)
    assert [e["index"] for e in evs] == list(range(1, 11))
    for e in evs[:-1]:
        assert e["generated_text"] is None and e["details"] is None
        assert set(e["token"]) == {"id", "text", "logprob", "special"}
    last = evs[-1]
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 10, "seed": None}
    plain = client.post("/generate", json={"inputs": "The list", "parameters": {"max_new_tokens": 10}}).json()
    assert last["generated_text"] == plain["generated_text"]
    assert "".join(e["token"]["text"] for e in evs if not e["token"]["special"]) == plain["generated_text"]


def test_stream_with_stop(client: httpx.Client) -> None:
    plain = client.post("/generate", json={"inputs": "The list", "parameters": {"max_new_tokens": 12}}).json()
    stop = plain["generated_text"][5:8]
    evs = stream(client, "The list", max_new_tokens=12, stop=[stop])
    assert evs[-1]["details"]["finish_reason"] == "stop_sequence"
    # Class 5: as in TGI, the stop sequence stays in generated_text, so the stream and the
    # final text agree.
    expected = plain["generated_text"][: plain["generated_text"].index(stop) + len(stop)]
    assert evs[-1]["generated_text"] == expected == "".join(e["token"]["text"] for e in evs)
    final = client.post("/generate", json={"inputs": "The list", "parameters": {"max_new_tokens": 12, "stop": [stop]}})
    assert final.json()["generated_text"] == expected


def test_stream_validation_error_is_422_before_stream(client: httpx.Client) -> None:
    r = client.post("/generate_stream", json={"inputs": "hi", "parameters": {"top_p": 2}})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def test_disconnect_frees_the_slot(server: Server) -> None:
    before = metric(server.url, "textgen_cancelled_requests_total")
    body = b'{"inputs": "The list", "parameters": {"max_new_tokens": 200, "min_new_tokens": 200}}'
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    sock.settimeout(30)
    received = b""
    while b"data:" not in received:  # wait until generation is running
        chunk = sock.recv(4096)
        assert chunk, "server closed the stream early"
        received += chunk
    assert metric(server.url, "textgen_batch_size") >= 1
    sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (
            metric(server.url, "textgen_cancelled_requests_total") > before
            and metric(server.url, "textgen_batch_size") == 0
        ):
            break
        time.sleep(0.05)
    assert metric(server.url, "textgen_cancelled_requests_total") == before + 1
    assert metric(server.url, "textgen_batch_size") == 0


def test_non_streaming_disconnect_cancels(server: Server) -> None:
    before = metric(server.url, "textgen_cancelled_requests_total")
    body = b'{"inputs": "The list", "parameters": {"max_new_tokens": 250, "min_new_tokens": 250}}'
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while metric(server.url, "textgen_batch_size") == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # wait until it is generating, then hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server.url, "textgen_cancelled_requests_total") == before:
        time.sleep(0.05)
    assert metric(server.url, "textgen_cancelled_requests_total") == before + 1

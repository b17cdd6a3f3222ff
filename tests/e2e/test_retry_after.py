"""503s while the model loads carry `Retry-After` in every route family (TGI, OpenAI, Anthropic,
Ollama, vLLM's /tokenize) and on /health. The server loads slowly for real: its
TEXTGEN_CHAT_TEMPLATE is a named pipe that the test fills only when it is done asking."""

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from huggingface_hub import InferenceClient, constants
from huggingface_hub.errors import HfHubHTTPError, TextGenerationError

from tests.e2e.server import free_port, stop, wait_healthy

TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@contextlib.contextmanager
def gated_template(tmp_path: Path) -> Iterator[tuple[Path, threading.Event]]:
    """A TEXTGEN_CHAT_TEMPLATE file that is a named pipe: the server's load reads it last, and
    blocks there until `open_gate` is set and the template is written into it."""
    pipe_path = tmp_path / "template.jinja"
    os.mkfifo(pipe_path)
    open_gate, done = threading.Event(), threading.Event()

    def feed() -> None:  # opening for writing waits for the reader
        open_gate.wait()
        if not done.is_set():
            with contextlib.suppress(BrokenPipeError), pipe_path.open("w") as pipe:
                pipe.write(TEMPLATE)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield pipe_path, open_gate
    finally:
        done.set()
        open_gate.set()
        fd = os.open(pipe_path, os.O_RDONLY | os.O_NONBLOCK)  # frees a writer still waiting to open
        feeder.join(10)
        os.close(fd)


def check_retry_after(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    seconds = response.headers.get("retry-after")
    assert seconds is not None and seconds.isdigit() and int(seconds) >= 1, dict(response.headers)


def test_503_while_loading_says_when_to_retry(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session runs with HF_HUB_OFFLINE=1, which also blocks huggingface_hub's client from 127.0.0.1.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with gated_template(tmp_path) as (template, open_gate):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
        env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TEXTGEN_SERVED_MODEL_NAME": "tiny"})
        env["TEXTGEN_CHAT_TEMPLATE"] = str(template)
        log_path = tmp_path / "server.log"
        command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        with log_path.open("w") as log:
            process = subprocess.Popen([*command, "--model", str(tiny_gpt2_dir)], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 90
            while True:  # listening (and loading) once /health answers at all
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    health = httpx.get(f"{url}/health", timeout=5)
                    break
                time.sleep(0.2)
            check_retry_after(health)
            check_retry_after(httpx.post(f"{url}/generate", json={"inputs": "Hi"}, timeout=30))
            vllm = httpx.post(f"{url}/tokenize", json={"prompt": "Hi"}, timeout=30)
            check_retry_after(vllm)
            assert set(vllm.json()["error"]) == {"message", "type", "param", "code"}, vllm.text  # still vLLM's shape

            oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
            with pytest.raises(openai.InternalServerError) as o:
                oai.completions.create(model="tiny", prompt="Hi", max_tokens=2)
            check_retry_after(o.value.response)

            claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=30)
            with pytest.raises(anthropic.InternalServerError) as a:
                claude.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
            check_retry_after(a.value.response)

            with pytest.raises(ollama.ResponseError) as ol:
                ollama.Client(host=url, timeout=30).generate(model="tiny", prompt="Hi")
            assert ol.value.status_code == 503
            check_retry_after(httpx.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "Hi"}, timeout=30))

            with pytest.raises(TextGenerationError) as hf:  # TGI's client: the 503's message, raised
                InferenceClient(base_url=url, timeout=30).text_generation("Hi", max_new_tokens=2)
            cause = hf.value.__cause__
            assert isinstance(cause, HfHubHTTPError) and cause.response is not None, repr(hf.value)
            check_retry_after(cause.response)

            open_gate.set()
            wait_healthy(url, process, log_path, timeout=120)
            ok = httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
            assert ok.status_code == 200 and "retry-after" not in ok.headers
        finally:
            stop(process)

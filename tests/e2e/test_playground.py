"""The playground at / in a real browser: Debian's headless Chromium driven by Playwright for Python,
against real `textgen serve` processes. A screenshot goes to tests/artifacts/ (ignored by git)."""

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import build_tiny_gpt2
from tests.e2e.server import Server, free_port, start, stop

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# The machine notes' flags for a quiet headless Chromium with no network of its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a 2048-token context, so a generation can run long enough to be stopped."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-long"), n_positions=2048)


@pytest.fixture(scope="module")
def server(long_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(long_model, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop(srv.process)


@pytest.fixture()
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    yield pg
    context.close()


def open_ready(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('server-status').textContent.startsWith('Ready')")


def fill_settings(page, **values: object) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def cancelled_total(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "textgen_cancelled_requests":
            return sum(s.value for s in family.samples if s.name == "textgen_cancelled_requests_total")
    raise AssertionError("textgen_cancelled_requests_total is missing from /metrics")


def test_completion_streams_tokens_with_alternatives(page, server: Server) -> None:
    open_ready(page, server.url)
    assert page.is_checked("#mode-completion")
    assert page.is_disabled("#mode-chat")  # this model has no chat template
    prompt = "The list"
    page.fill("#prompt", prompt)
    fill_settings(page, max_tokens=24, temperature=0, top_n=5)
    page.click("#generate")
    page.wait_for_selector("#output[data-state='done']")
    assert page.text_content("#form-error") == ""

    tokens = page.eval_on_selector_all("#output .tok", "els => els.map(e => e.textContent)")
    expected = httpx.post(
        server.url + "/v1/completions",
        json={"model": str(server_model(server)), "prompt": prompt, "max_tokens": 24, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]
    # The tokens' texts join to exactly the text the API generates for the same request.
    assert "".join(tokens) == expected["text"]
    assert len(tokens) == int(page.text_content("#stat-generated"))
    assert page.text_content("#stat-finish") == expected["finish_reason"]
    assert page.text_content("#stat-ttft").endswith(" ms")
    prompt_count = httpx.post(server.url + "/tokenize", json={"inputs": prompt}, timeout=30).json()["count"]
    assert page.text_content("#stat-prompt") == str(prompt_count)

    # Prompt tokens come back with echo; they join to the prompt.
    prompt_tokens = page.eval_on_selector_all("#prompt-tokens .tok", "els => els.map(e => e.textContent)")
    assert len(prompt_tokens) == prompt_count
    assert "".join(prompt_tokens) == prompt

    # Hover shows the alternatives (top 5) with probabilities; greedy picked the most likely one.
    page.hover("#output .tok >> nth=0")
    page.wait_for_selector("#tip:not([hidden])")
    rows = page.eval_on_selector_all("#tip tr", "rows => rows.map(r => r.innerText)")
    assert len(rows) == 5
    assert all(row.strip().endswith("%") for row in rows)
    assert page.get_attribute("#tip tr >> nth=0", "class") == "chosen"
    # Keyboard: focusing a token shows its tooltip too.
    page.mouse.move(0, 0)
    page.wait_for_selector("#tip", state="hidden")
    page.focus("#output .tok >> nth=1")
    page.wait_for_selector("#tip:not([hidden])")

    page.check("#boundaries")
    assert "boundaries" in (page.get_attribute("#tokens", "class") or "")
    ARTIFACTS.mkdir(exist_ok=True)
    page.hover("#output .tok >> nth=3")
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)


def server_model(server: Server) -> str:
    return httpx.get(server.url + "/info", timeout=30).json()["model_id"]


def test_stop_cancels_on_the_server(page, server: Server) -> None:
    open_ready(page, server.url)
    before = cancelled_total(server.url)
    # min_tokens = max_tokens: no EOS, so this runs for thousands of tokens unless stopped.
    fill_settings(page, max_tokens=2000, min_tokens=2000, temperature=1, top_n=2)
    page.fill("#prompt", "A long answer")
    page.click("#generate")
    # Streamed: tokens appear while the request is still running.
    page.wait_for_function(
        "document.querySelectorAll('#output .tok').length >= 3 && "
        "document.getElementById('output').dataset.state === 'streaming'"
    )
    page.click("#stop")
    page.wait_for_selector("#output[data-state='done']")
    assert page.text_content("#stat-finish") == "stopped"
    shown = page.eval_on_selector_all("#output .tok", "els => els.length")
    assert shown < 2000
    deadline_checks = 100
    while cancelled_total(server.url) <= before and deadline_checks:
        page.wait_for_timeout(100)
        deadline_checks -= 1
    assert cancelled_total(server.url) == before + 1


def test_chat_mode_with_a_template(page, browser, long_model: Path, tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    srv = start(long_model, env={"TEXTGEN_CHAT_TEMPLATE": str(template)}, log_dir=tmp_path)
    try:
        open_ready(page, srv.url)
        assert page.is_checked("#mode-chat")  # a templated model opens in chat mode
        assert page.is_visible("#system")  # the chat fields are shown
        fill_settings(page, max_tokens=8, min_tokens=8, temperature=0, top_n=3)
        page.fill("#prompt", "What is a list?")
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")  # the keyboard shortcut generates
        page.wait_for_selector("#output[data-state='done']")
        assert page.text_content("#form-error") == ""
        items = page.eval_on_selector_all("#history li", "els => els.map(e => e.textContent)")
        assert len(items) == 2
        assert items[0] == "user: What is a list?"
        reply = "".join(page.eval_on_selector_all("#output .tok", "els => els.map(e => e.textContent)"))
        assert items[1] == "assistant: " + reply
        assert page.text_content("#stat-generated") == "8"
        assert page.text_content("#stat-finish") == "length"
        assert page.input_value("#prompt") == ""
    finally:
        stop(srv.process)


def test_api_key_prompt(page, long_model: Path, tmp_path: Path) -> None:
    srv = start(long_model, env={"TEXTGEN_API_KEY": "sesame"}, log_dir=tmp_path)
    try:
        # The page loads without a key; the API does not answer without one.
        assert httpx.get(srv.url + "/", timeout=30).status_code == 200
        assert httpx.get(srv.url + "/ui/app.js", timeout=30).status_code == 200
        assert httpx.post(srv.url + "/", json={"inputs": "hi"}, timeout=30).status_code == 401
        page.goto(srv.url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        assert page.evaluate("document.activeElement.id") == "api-key"
        page.fill("#api-key", "wrong")
        page.click("#key-submit")
        page.wait_for_function("document.getElementById('key-error').textContent.includes('refused')")
        page.fill("#api-key", "sesame")
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('server-status').textContent.startsWith('Ready')")
        assert page.is_hidden("#key-form")
        assert page.evaluate("sessionStorage.getItem('textgen-api-key')") == "sesame"
        fill_settings(page, max_tokens=4, temperature=0)
        page.click("#generate")
        page.wait_for_selector("#output[data-state='done']")
        assert page.text_content("#form-error") == ""
        assert page.text_content("#stat-generated") == str(
            page.eval_on_selector_all("#output .tok", "els => els.length")
        )
        # A reload in the same tab keeps the key (sessionStorage): no prompt this time.
        page.reload()
        page.wait_for_function("document.getElementById('server-status').textContent.startsWith('Ready')")
        assert page.is_hidden("#key-form")
    finally:
        stop(srv.process)


def test_demo_build_progress_while_listening(page, tmp_path: Path) -> None:
    """Without TEXTGEN_MODEL and no demo model yet, the server listens at once, /health reports the
    build, the page shows it; SIGTERM stops the build child and exits cleanly."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        body = wait_for_health(url, process, lambda b: b.get("status") == "building")
        assert set(body["progress"]) == {"phase", "step", "total_steps", "fraction", "elapsed_s", "eta_s"}
        assert httpx.get(url + "/ready", timeout=10).status_code == 503
        assert httpx.post(url + "/generate", json={"inputs": "hi"}, timeout=10).status_code == 503
        page.goto(url + "/")
        page.wait_for_selector("#building:not([hidden])")
        # The child reports training steps; the page follows them.
        wait_for_health(url, process, lambda b: b.get("progress", {}).get("step", 0) >= 1, timeout=240)
        page.wait_for_function(
            "document.getElementById('building-detail').textContent.includes('training step') && "
            "document.getElementById('building-progress').value > 0",
            timeout=10_000,
        )
        children = psutil.Process(process.pid).children(recursive=True)
        assert children, "the build runs in a child process"
    finally:
        code = stop(process)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not (tmp_path / "cache" / "textgen" / "demo-model" / "config.json").exists()


def wait_for_health(
    url: str, process: subprocess.Popen, predicate: Callable[[dict], bool], timeout: float = 90
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            r = httpx.get(url + "/health", timeout=5)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        assert r.status_code == 503, "the demo model cannot be ready this soon"
        if predicate(r.json()):
            return r.json()
        time.sleep(0.2)
    raise AssertionError(f"/health never matched within {timeout} s")

"""The playground's Decide mode in a real browser (Chromium through Playwright, as
tests/e2e/test_playground.py): input and questions in, one probability bar per option out, the same
numbers as /v1/decisions."""

import httpx
import pytest

from tests.e2e.server import Server
from tests.e2e.test_playground import ARTIFACTS, browser, long_model, open_ready, page, server

__all__ = ["browser", "long_model", "page", "server"]  # fixtures used below
pytestmark = pytest.mark.slow


def test_decide_mode_shows_a_bar_per_option(page, server: Server) -> None:  # noqa: F811 - fixtures
    open_ready(page, server.url)
    page.check("#mode-decide")
    assert page.is_hidden("#chat-only") and page.is_visible("#questions")
    assert page.inner_text("#generate") == "Decide"
    text = "My package has not arrived and I was charged twice."
    page.fill("#prompt", text)
    page.click("#generate")
    page.wait_for_selector("#decisions .decision >> nth=2")
    titles = page.locator("#decisions h3").all_inner_texts()
    assert [t.split(" ")[0] for t in titles] == ["department", "angry", "urgency"]
    bars = page.locator("#decisions .decision").nth(0).locator("[role=meter]")
    shown = [float(bars.nth(i).get_attribute("aria-valuenow") or "nan") for i in range(bars.count())]
    assert len(shown) == 3 and abs(sum(shown) - 1) < 1e-6
    questions = page.evaluate("JSON.parse(document.getElementById('questions').value)")
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    direct = httpx.post(
        server.url + "/v1/decisions", json={"model": model, "input": text, "questions": questions}, timeout=120
    ).json()
    assert shown == [p["probability"] for p in direct["answers"][0]["probabilities"]]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-decide.png"), full_page=True)
    page.fill("#questions", "[{")
    page.click("#generate")
    page.wait_for_function("document.getElementById('form-error').textContent.includes('not valid JSON')")

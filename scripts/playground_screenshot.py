"""Take the README's playground screenshot (docs/playground.png) from a real server and browser.

    python scripts/playground_screenshot.py --model ~/.cache/textgen/demo-model --out docs/playground.png

Needs Debian's Chromium (/usr/bin/chromium) and Playwright for Python (a dev extra).
"""

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.e2e.server import start, stop  # noqa: E402
from tests.e2e.test_playground import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Model directory to serve.")
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    parser.add_argument("--prompt", default="The list")
    parser.add_argument("--hover", type=int, default=6, help="Index of the generated token to hover.")
    args = parser.parse_args()
    server = start(args.model, args=["--served-model-name", "textgen-demo"])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('server-status').textContent.startsWith('Ready')")
            page.fill("#prompt", args.prompt)
            for name, value in {"max_tokens": 40, "temperature": 0.7, "seed": 7, "top_n": 5}.items():
                page.fill(f"#{name}", str(value))
            page.click("#generate")
            page.wait_for_selector("#output[data-state='done']", state="attached", timeout=120_000)
            page.hover(f"#output .tok >> nth={args.hover}")
            page.wait_for_selector("#tip:not([hidden])")
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        stop(server.process)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

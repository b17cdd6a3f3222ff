"""scripts/container-smoke.sh is valid bash, is wired to `make container-smoke` and stays out of
`make test` (it needs root, buildah and minutes of building)."""

import os
import re
import shutil
import subprocess

import pytest

from .conftest import ROOT

SCRIPT = ROOT / "scripts" / "container-smoke.sh"


def _rule(name: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{name}\s*:", line))
    recipe = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line)
    return recipe


def test_script_is_executable_bash():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_script_passes_shellcheck():
    subprocess.run(["shellcheck", "--severity=warning", str(SCRIPT)], check=True)


def test_make_rule_runs_the_script_and_is_not_part_of_make_test():
    rule = _rule("container-smoke")
    assert any("scripts/container-smoke.sh" in line for line in rule[1:])
    phony = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith(".PHONY"))
    assert "container-smoke" in phony.split()
    assert not any("container-smoke" in line for line in _rule("test"))


def test_script_bounds_its_waits():
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text
    # the build, the start-up wait and every curl are bounded
    assert re.search(r"timeout \"\$BUILD_TIMEOUT\" buildah bud", text)
    assert "START_TIMEOUT" in text
    calls = [line for line in text.splitlines() if re.search(r"(^|[\s(])curl -", line)]
    assert len(calls) >= 4
    for line in calls:
        assert "--max-time" in line, line

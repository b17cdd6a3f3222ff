"""The README and docs/ stay true: every setting is in the README's configuration table, every metric
the app exports is documented (the metrics table is in docs/operating.md, a feature's own metrics
beside it), the README's module map names what app/ holds, and every
relative link in them reaches an existing file and heading."""

import re
from pathlib import Path

from app.config import Settings
from app.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = "\n".join([README, *(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))])
FENCE = re.compile(r"^\s*(```|~~~)")


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`TEXTGEN_{name.upper()}`" in README, name


def test_every_metric_is_documented() -> None:
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}" in DOCS, name


def module_map() -> list[str]:
    """The paths listed in the README's `## Where things are` code block."""
    section = README.split("\n## Where things are\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 1)[1].split("```", 1)[0]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_the_module_map_names_only_what_exists() -> None:
    paths = module_map()
    assert len(paths) >= 10
    for path in paths:
        assert (ROOT / path).exists(), f"the README's module map names {path}, which does not exist"


def test_the_module_map_names_every_part_of_app() -> None:
    paths = set(module_map())
    for child in (ROOT / "app").iterdir():
        if child.name.startswith(("_", ".")):
            continue
        if child.is_dir():
            assert f"app/{child.name}/" in paths, f"app/{child.name}/ is missing from the README's module map"
        elif child.suffix == ".py":
            assert f"app/{child.name}" in paths, f"app/{child.name} is missing from the README's module map"


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text."""
    out, fenced = set(), False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6} (.+?)\s*$", line)):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_reach_a_file_and_a_heading() -> None:
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        fenced = False
        for line in page.read_text().splitlines():
            if FENCE.match(line):
                fenced = not fenced
                continue
            if fenced:
                continue
            for target, _, anchor in re.findall(r"\]\(([^)\s#]*)(#([^)\s]+))?\)", line):
                if target.startswith(("http:", "https:", "mailto:")):
                    continue
                path = (page.parent / target) if target else page
                if not path.exists():
                    broken.append(f"{page.relative_to(ROOT)}: {target}")
                elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
                    broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, broken

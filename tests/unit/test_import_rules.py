"""The import rules in pyproject.toml ([tool.importlinter], run by `make lint`) hold for app/, and
they can fail: a copy of app/ with one bad import breaks them, TYPE_CHECKING-only imports included."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports with this repository's contracts on the `app` package under `root`."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def app_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__", "ui"))
    return tmp_path


def add_import(root: Path, module: str, line: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_app_keeps_the_import_rules() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_unchanged_copy_passes(app_copy: Path) -> None:
    # The control for the tests below: the copy itself is fine, so a failure there is the edit's.
    result = lint_imports(app_copy)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_engine_importing_http_fails(app_copy: Path) -> None:
    add_import(app_copy, "app.engine.core.types", "from app.api import errors as _errors  # noqa")
    result = lint_imports(app_copy)
    assert result.returncode == 1
    assert "The engine knows nothing of HTTP BROKEN" in result.stdout.replace("\n", " ")
    assert "app.engine.core.types -> app.api.errors" in result.stdout


def test_the_server_importing_finetune_fails(app_copy: Path) -> None:
    add_import(app_copy, "app.service", "import app.finetune.sizes  # noqa")
    result = lint_imports(app_copy)
    assert result.returncode == 1
    assert "app.service -> app.finetune.sizes" in result.stdout


def test_a_type_checking_only_circle_fails(app_copy: Path) -> None:
    # sequence <- engine already; an annotation-only import back closes a circle.
    add_import(
        app_copy,
        "app.engine.core.sequence",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from app.engine.engine import Engine  # noqa",
    )
    result = lint_imports(app_copy)
    assert result.returncode == 1
    assert "No cycles are allowed in app.engine" in result.stdout


def test_one_route_family_importing_another_fails(app_copy: Path) -> None:
    add_import(app_copy, "app.api.generate", "from app.api import tokenize as _tokenize  # noqa")
    result = lint_imports(app_copy)
    assert result.returncode == 1
    assert "app.api.generate -> app.api.tokenize" in result.stdout


def test_an_upward_import_inside_the_engine_fails(app_copy: Path) -> None:
    # The Scheduler (core) importing a runner: a layer may import only the layers below it.
    add_import(app_copy, "app.engine.core.scheduler", "import app.engine.runner.runner  # noqa")
    result = lint_imports(app_copy)
    assert result.returncode == 1
    assert "The engine is layered" in result.stdout and "BROKEN" in result.stdout
    assert "app.engine.core.scheduler -> app.engine.runner.runner" in result.stdout

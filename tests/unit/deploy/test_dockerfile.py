"""The Dockerfile installs like `make install`, runs as non-root and checks /health."""

import json
import re
import shlex
import subprocess

from .conftest import ROOT, dockerfile_env, parse_dockerfile, parse_duration


def _makefile_vars() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^(\w+)\s*\?=\s*(.+?)\s*$", text, flags=re.M))


def _makefile_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def _args(instructions) -> dict[str, str]:
    out = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            out.setdefault(key, value.strip('"'))
    return out


def test_parser_joins_continuations_and_drops_comments():
    parsed = parse_dockerfile('# c\nFROM x AS y\nRUN a \\\n# inner comment\n  && b\n\nCMD ["z"]\n')
    assert parsed == [("FROM", "x AS y"), ("RUN", "a  && b"), ("CMD", '["z"]')]


def test_build_args_and_defaults(dockerfile):
    args = _args(dockerfile)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_SPEC"] == _makefile_vars()["TORCH_SPEC"] == "torch==2.13.0"
    for name in ("TORCH_INDEX_URL", "PIP_FIND_LINKS", "TORCH_VARIANT"):
        assert name in args, f"build arg {name} missing"
    froms = [a for k, a in dockerfile if k == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all(f.startswith("${BASE_IMAGE}") for f in froms), froms


def test_install_steps_match_makefile(dockerfile):
    """torch (TORCH_SPEC) is installed first, then the project with the train extra, as `make install`
    does; the image installs neither editable nor with the dev extra."""
    make = _makefile_recipe("$(VENV)/.installed")
    make_torch = next(i for i, line in enumerate(make) if "pip install" in line and "$(TORCH_SPEC)" in line)
    make_project = next(i for i, line in enumerate(make) if "pip install" in line and '".[$(EXTRAS)]"' in line)
    assert make_torch < make_project
    assert "train" in _makefile_vars()["EXTRAS"].split(",")

    runs = [a for k, a in dockerfile if k == "RUN"]
    torch_run = next(i for i, a in enumerate(runs) if "pip install" in a and "${TORCH_SPEC}" in a)
    project_run = next(i for i, a in enumerate(runs) if re.search(r"pip install\b.*\"\.\[train\]\"", a))
    assert torch_run < project_run
    project = runs[project_run]
    assert " -e " not in project and "--editable" not in project
    assert "dev" not in re.search(r'"\.\[([^\]]*)\]"', project).group(1)
    # the project is copied only after torch is installed, so source edits keep the torch layer
    keys = [k for k, _ in dockerfile]
    first_copy_src = next(i for i, (k, a) in enumerate(dockerfile) if k == "COPY" and "--from" not in a)
    torch_idx = [i for i, (k, a) in enumerate(dockerfile) if k == "RUN" and "${TORCH_SPEC}" in a][0]
    assert torch_idx < first_copy_src, keys


def test_runtime_stage_contract(dockerfile):
    last_from = max(i for i, (k, _) in enumerate(dockerfile) if k == "FROM")
    runtime = dockerfile[last_from:]
    users = [a for k, a in runtime if k == "USER"]
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"

    assert [a for k, a in runtime if k == "EXPOSE"] == ["8000"]
    env = dockerfile_env(dockerfile)
    assert env["TEXTGEN_HOST"] == "0.0.0.0"
    assert env.get("TEXTGEN_PORT", "8000") == "8000"
    volumes = [v for k, a in runtime if k == "VOLUME" for v in json.loads(a)]
    assert env["XDG_CACHE_HOME"] in volumes
    assert env.get("HF_HOME", env["XDG_CACHE_HOME"]).startswith(env["XDG_CACHE_HOME"])

    cmd = [a for k, a in runtime if k == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["textgen", "serve"]


def test_healthcheck_probes_health_with_a_long_start_period(dockerfile):
    checks = [a for k, a in dockerfile if k == "HEALTHCHECK"]
    assert len(checks) == 1
    check = checks[0]
    assert "/health" in check
    options = dict(re.findall(r"--([\w-]+)=(\S+)", check.split(" CMD ")[0]))
    # the first start without TEXTGEN_MODEL builds the demo model (~3 min)
    assert parse_duration(options["start-period"]) >= 300
    assert parse_duration(options["timeout"]) < parse_duration(options["interval"])
    # exec form with the image's python: slim bases have no curl or wget
    exec_form = json.loads(check.split(" CMD ", 1)[1])
    assert exec_form[0] in ("python3", "python", "/opt/venv/bin/python")


def test_healthcheck_command_is_valid_python(dockerfile):
    check = next(a for k, a in dockerfile if k == "HEALTHCHECK")
    exec_form = json.loads(check.split(" CMD ", 1)[1])
    assert exec_form[1] == "-c"
    compile(exec_form[2], "<healthcheck>", "exec")


def test_run_steps_are_valid_sh(dockerfile):
    for keyword, args in dockerfile:
        if keyword == "RUN":
            subprocess.run(["sh", "-n", "-c", args], check=True)


def test_dockerignore_keeps_the_context_small():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # an allow-list: ignore everything, then re-include what `pip install .` reads
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "app"} <= allowed
    assert not allowed & {".venv", ".git", "tests", "bench"}
    for path in ("pyproject.toml", "app"):
        assert (ROOT / path).exists()


def test_copy_sources_exist(dockerfile):
    for keyword, args in dockerfile:
        if keyword == "COPY" and "--from" not in args:
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), source

"""bench/gpu.sh runs end to end in its CPU dry-run mode (the GPU run is the same code path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_gpu_script_dry_run_writes_results(gpt2_tokenizer_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), str(tmp_path), "--dry-run", "--tokenizer", str(gpt2_tokenizer_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["dry_run"] is True
    for name in ("cpu-float32-eager", "cpu-float32-compiled"):  # TEXTGEN_COMPILE off and on
        run = results["configs"][name]
        assert "error" not in run and "skipped" not in run, run
        assert run["info"]["model_device_type"] == "cpu"
        assert run["info"]["compile"]["enabled"] is name.endswith("compiled")
        assert [level["concurrency"] for level in run["levels"]] == [1, 4]
        for level in run["levels"]:
            assert level["errors"] == 0
            assert level["generated_tokens"] == level["requests"] * results["workload"]["new_tokens"]
            assert level["tok_per_s"] > 0
        assert name in proc.stdout  # the table

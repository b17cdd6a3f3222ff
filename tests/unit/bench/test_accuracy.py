"""bench.accuracy prints each mode's KL divergence and top-1 agreement against fp32."""

from pathlib import Path

import pytest

from bench.accuracy import main


def test_accuracy_prints_a_row_per_mode(stories260k_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    modes = "int8-weight-only,int4-weight-only"
    assert main(["--model", str(stories260k_dir), "--prompts", "3", "--tokens", "5", "--modes", modes]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(modes.split(","))
    for mean_kl, max_kl, top1 in rows.values():
        assert 0 < float(mean_kl) <= float(max_kl) < 5  # quantized: not bitwise fp32, not noise
        assert 0 < float(top1.rstrip("%")) <= 100


def test_accuracy_refuses_an_unknown_mode() -> None:
    with pytest.raises(SystemExit):
        main(["--modes", "int3"])


def test_llama_rows_are_skipped_with_the_reason_when_llama_server_is_not_built(
    stories260k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert main(["--model", str(stories260k_dir), "--prompts", "2", "--tokens", "3", "--modes", "llama.cpp-q8_0"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("llama.cpp-q8_0") and "skipped: llama-server not built" in row and "bench-peers" in row


def test_llama_distribution_covers_the_vocabulary() -> None:
    import math

    from bench.llama_accuracy import FLOOR_LOGPROB, probs_body, row_from_response

    body = probs_body([1, 5, 9], 4)
    assert body["n_probs"] == 4 and body["n_predict"] == 1 and body["prompt"] == [1, 5, 9]
    assert body["post_sampling_probs"] is False and body["cache_prompt"] is True and body["id_slot"] == -1
    assert probs_body([1], 4, slot=3)["id_slot"] == 3
    top = [{"id": 2, "logprob": -0.1}, {"id": 0, "logprob": -2.5}, {"id": 3, "logprob": None}, {"id": 1, "logprob": -9}]
    row = row_from_response({"completion_probabilities": [{"id": 2, "top_logprobs": top}]}, 4)
    assert row.tolist() == pytest.approx([-2.5, -9.0, -0.1, FLOOR_LOGPROB])
    with pytest.raises(ValueError, match="2 of 4"):
        row_from_response({"completion_probabilities": [{"top_logprobs": top[:2]}]}, 4)
    with pytest.raises(ValueError, match="no completion_probabilities"):
        row_from_response({"content": "x"}, 4)
    assert math.isfinite(FLOOR_LOGPROB)


def test_divergence_is_zero_for_equal_distributions_and_counts_top1() -> None:
    import torch

    from bench.accuracy import divergence

    ref = torch.log_softmax(torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]]), -1)
    kl, top1 = divergence(ref, ref)
    assert float(kl.abs().max()) < 1e-6 and top1 == 1.0
    other = torch.log_softmax(torch.tensor([[[2.0, 1.0, 0.0], [3.0, 0.0, 1.0]]]), -1)
    kl, top1 = divergence(ref, other)
    assert top1 == 0.5 and float(kl[0, 0]) < 1e-6 < float(kl[0, 1])

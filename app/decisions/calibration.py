"""Temperature scaling for decisions: fit one temperature on held-out answers, measure expected
calibration error, and keep the temperature beside an adapter (read by the server).

Temperature scaling (Guo et al., 2017): probabilities softmax(s / T) over the options' logprob
sums s, with the T > 0 that minimises the held-out negative log-likelihood. It changes
confidences, never which option is most likely.
"""

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

from app.decisions.score import argmax, normalise

CALIBRATION_FILE = "decisions.json"  # in an adapter's directory: {"temperature": T, ...}
T_MIN, T_MAX = 0.05, 20.0  # the temperature search's bounds


def nll(sums: Sequence[Sequence[float]], labels: Sequence[int], temperature: float) -> float:
    """Mean negative log-likelihood of the right options at `temperature`."""
    total = 0.0
    for s, label in zip(sums, labels, strict=True):
        total -= math.log(max(normalise(s, temperature)[label], 1e-300))
    return total / len(labels)


def fit_temperature(sums: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """The T in [T_MIN, T_MAX] minimising `nll`: a golden-section search on log T (nll is smooth
    and, on log T, unimodal in practice). 1.0 when there is nothing to fit."""
    if not labels:
        return 1.0
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(sums, labels, math.exp(a)), nll(sums, labels, math.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(sums, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(sums, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


def bound_advice(temperature: float) -> str | None:
    """What to do when the fitted temperature sits at a search bound (the best one lies beyond it,
    so the confidences stay off), else None."""
    if math.isclose(temperature, T_MAX, rel_tol=1e-3):
        return (
            f"the fitted temperature hit its upper bound ({T_MAX:g}): the model is confidently wrong on the "
            "held-out answers, so its confidences stay too high. Train on more data or for more steps "
            "(--max-steps/--epochs), then fine-tune again"
        )
    if math.isclose(temperature, T_MIN, rel_tol=1e-3):
        return (
            f"the fitted temperature hit its lower bound ({T_MIN:g}): the held-out answers are right but "
            "barely preferred, so its confidences stay too low. Hold out more data (--eval-split) to fit it"
        )
    return None


def template_hash(template: str | None) -> str | None:
    """sha256 of a chat template's text (None: no template, completion-style prompts)."""
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()


def accuracy(sums: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    return sum(argmax(s) == label for s, label in zip(sums, labels, strict=True)) / max(len(labels), 1)


def expected_calibration_error(
    sums: Sequence[Sequence[float]], labels: Sequence[int], temperature: float = 1.0, bins: int = 10
) -> float:
    """ECE: confidence (top probability) against accuracy in `bins` equal-width bins, weighted by
    the share of answers in each bin."""
    grouped: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for s, label in zip(sums, labels, strict=True):
        p = normalise(s, temperature)
        best = argmax(p)
        grouped[min(int(p[best] * bins), bins - 1)].append((p[best], best == label))
    total = sum(len(g) for g in grouped)
    if total == 0:
        return 0.0
    error = 0.0
    for group in grouped:
        if group:
            confidence = sum(c for c, _ in group) / len(group)
            hit = sum(ok for _, ok in group) / len(group)
            error += len(group) / total * abs(confidence - hit)
    return error


def write_calibration(
    directory: Path, temperature: float, metrics: dict[str, float], template: str | None = None
) -> Path:
    """decisions.json: the temperature, the metrics, and `chat_template_sha256`, the hash of the
    chat template that rendered the training prompts (null: completion style), which a server
    must render with too (`recorded_template_hash`)."""
    path = directory / CALIBRATION_FILE
    body = {"temperature": temperature, "chat_template_sha256": template_hash(template), **metrics}
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return path


def recorded_template_hash(directory: str | Path) -> tuple[bool, str | None]:
    """(whether the adapter's decisions.json records a template hash, that hash: None for
    completion-style prompts). Adapters without the file or the key (older ones) record none."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return False, None
    body = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(body, dict) or "chat_template_sha256" not in body:
        return False, None
    value = body["chat_template_sha256"]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: chat_template_sha256 must be a string or null, not {value!r}")
    return True, value


def read_temperature(directory: str | Path) -> float:
    """The adapter's fitted temperature; 1.0 when it has none. ValueError for a malformed file."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return 1.0
    value = json.loads(path.read_text(encoding="utf-8")).get("temperature", 1.0)
    if not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{path}: temperature must be a positive number, not {value!r}")
    return float(value)

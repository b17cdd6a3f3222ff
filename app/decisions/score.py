"""From option logprob sums to the API's answers.

An option's score is the sum of its tokens' logprobs after the shared prompt (the log-probability
of the whole continuation). Probabilities are the softmax of those sums over the question's
options, divided first by a temperature (1 unless a fine-tuned adapter brought a calibrated one):
p_k = exp(s_k / T) / sum_j exp(s_j / T), computed in float64. This is the model's distribution
over complete answers conditioned on the answer being one of the options.

`confidence` is the probability of the answer given: of `choice` for a choice question, of the most
likely level for a score question. `score` is the probability-weighted mean of the zero-based level
indices, sum_k k * p_k.
"""

import math
from collections.abc import Sequence
from typing import Any

from app.decisions.questions import Question


def normalise(sums: Sequence[float], temperature: float = 1.0) -> list[float]:
    """softmax(sums / temperature) in float64; sums are finite (the engine clamps at -1e4)."""
    scaled = [s / temperature for s in sums]
    top = max(scaled)
    weights = [math.exp(s - top) for s in scaled]
    total = math.fsum(weights)
    return [w / total for w in weights]


def argmax(probabilities: Sequence[float]) -> int:
    """The first index of the largest probability (ties go to the earlier option)."""
    return max(range(len(probabilities)), key=lambda k: (probabilities[k], -k))


def answer(question: Question, probabilities: Sequence[float]) -> dict[str, Any]:
    """The answer object for `question` (the SDK's `Answer` shapes) given its options' probabilities."""
    if question.kind == "predicate":
        return {"type": "predicate", "name": question.name, "probability": probabilities[0]}
    best = argmax(probabilities)
    if question.kind == "choice":
        return {
            "type": "choice",
            "name": question.name,
            "choice": question.options[best].value,
            "confidence": probabilities[best],
            "probabilities": [
                {"value": o.value, "probability": p} for o, p in zip(question.options, probabilities, strict=True)
            ],
        }
    return {
        "type": "score",
        "name": question.name,
        "score": math.fsum(k * p for k, p in enumerate(probabilities)),
        "confidence": probabilities[best],
        "probabilities": [
            {"label": o.text, "value": k, "probability": p}
            for k, (o, p) in enumerate(zip(question.options, probabilities, strict=True))
        ],
    }

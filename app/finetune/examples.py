"""The one shape every input format is read into before tokenisation."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A training document. Loss is taken on `completion` only; plain text has an empty prompt."""

    completion: str
    prompt: str = ""

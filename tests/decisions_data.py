"""Synthetic customer messages routed to 3 departments, for the decisions fine-tune tests and docs.

Training and held-out messages use different items and different phrasings (templates): a model
that passes on the held-out set has learnt the department cues, not the sentences."""

import json
import random
from pathlib import Path

QUESTION = {
    "type": "choice",
    "name": "department",
    "instructions": "Which department should handle this customer message?",
    "choices": [
        {"value": "billing", "description": "charges, bills and payments"},
        {"value": "shipping", "description": "deliveries and packages"},
        {"value": "returns", "description": "sending items back"},
    ],
}

TRAIN_ITEMS = [
    "lamp", "chair", "red ball", "toy car", "blue hat", "book", "cup", "dress", "kite", "bed",
    "yellow box", "big dog toy", "cake", "pen", "spoon", "clock", "rug", "small boat", "drum", "sock",
]  # fmt: skip
HELD_ITEMS = ["table", "doll", "green coat", "teddy bear", "bike", "shoes"]

TRAIN = {
    "billing": [
        "I was charged twice for my {item}.",
        "Why is there an extra fee on my bill for the {item}?",
        "My card was charged but the {item} order says unpaid.",
        "The price I paid for the {item} is more than the bill said.",
        "Please fix the charge on my bill for the {item}.",
        "You took too much money from my card for the {item}.",
        "I need a new bill for the {item}, the charge is wrong.",
        "The payment for the {item} went through two times.",
    ],
    "shipping": [
        "My {item} has not arrived yet.",
        "Where is the package with my {item}?",
        "The delivery of my {item} is late.",
        "The box with my {item} was sent to the wrong house.",
        "When will the {item} be delivered?",
        "The {item} is still not here, the package is late.",
        "Nobody delivered my {item} and the package did not come.",
        "My package with the {item} has not arrived at my house.",
    ],
    "returns": [
        "I want to send back the {item}.",
        "The {item} is broken and I want to return it.",
        "Can I return the {item}? It is too small.",
        "How do I send the {item} back to you?",
        "I do not like the {item} and want to return it.",
        "Please take the {item} back, it is broken.",
        "The {item} came broken, I want to send it back.",
        "I want to return the {item} because it does not fit.",
    ],
}

HELD = {
    "billing": [
        "Hello, you charged my card two times for one {item}.",
        "There is a fee on my bill that I do not know, it was for a {item}.",
        "I paid for the {item} but the bill is wrong.",
    ],
    "shipping": [
        "Hello, the {item} I bought still has not arrived.",
        "The package with the {item} is lost, where is it?",
        "My {item} was not delivered today.",
    ],
    "returns": [
        "Hello, the {item} came broken, can I send it back?",
        "I would like to return this {item} please.",
        "The {item} does not fit me, I want to send it back.",
    ],
}


def messages(templates: dict[str, list[str]], items: list[str]) -> list[tuple[str, str]]:
    return [(t.format(item=item), dept) for dept, ts in templates.items() for t in ts for item in items]


def write_jsonl(path: Path, rows: list[tuple[str, str]], seed: int = 0) -> Path:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    lines = [json.dumps({"input": text, "question": QUESTION, "answer": dept}) for text, dept in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_set() -> list[tuple[str, str]]:
    return messages(TRAIN, TRAIN_ITEMS)  # 3 x 8 x 20 = 480 messages


def held_out_set() -> list[tuple[str, str]]:
    return messages(HELD, HELD_ITEMS)  # 3 x 3 x 6 = 54 messages, none seen in training

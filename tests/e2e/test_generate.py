"""POST /generate against a real server: shapes, determinism, stops, batching, validation."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.e2e.server import Server

PROMPTS = [
    "The list",
    "A function definition",
    "x",
    "Exceptions are raised when",
    "The import statement is used to bring a module into the current namespace, and",
    "class",
    "Return the value of the named attribute of object.",
    "for i in range(10):",
    "In this chapter",
    "The following identifiers are used as reserved words",
    "Objects",
    "Changed in version 3.8",
    "If the",
    "Dictionaries map keys to values; a dictionary display is a possibly empty series of key/datum pairs",
    "Note:",
    "while",
    "Operators",
    "Assignment statements are used to (re)bind names to values and to modify attributes",
    "The",
    "lambda",
    "See also",
    "Comparisons yield boolean values",
    "The with statement",
    "Coroutines",
]


def generate(client: httpx.Client, inputs: str, **parameters: object) -> dict:
    r = client.post("/generate", json={"inputs": inputs, "parameters": parameters})
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_shape_and_details(client: httpx.Client) -> None:
    plain = generate(client, "The list", max_new_tokens=5)
    assert set(plain) == {"generated_text"}
    assert isinstance(plain["generated_text"], str) and plain["generated_text"]

    out = generate(client, "The list", max_new_tokens=5, min_new_tokens=5, details=True)
    d = out["details"]
    assert d["finish_reason"] == "length"
    assert d["generated_tokens"] == 5 == len(d["tokens"])
    assert d["seed"] is None  # greedy
    assert out["generated_text"] == plain["generated_text"]
    for t in d["tokens"]:
        assert set(t) == {"id", "text", "logprob", "special"}
        assert t["logprob"] <= 0


def test_prefill_details(client: httpx.Client, tiny_gpt2_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    out = generate(client, "The list of", max_new_tokens=2, details=True, decoder_input_details=True)
    prefill = out["details"]["prefill"]
    assert [t["id"] for t in prefill] == tok("The list of")["input_ids"]
    assert prefill[0]["logprob"] is None
    assert all(t["logprob"] < 0 for t in prefill[1:])


def test_greedy_matches_model_generate(client: httpx.Client, tiny_gpt2_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    for prompt in PROMPTS[:4]:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        expected = tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
        assert generate(client, prompt, max_new_tokens=12)["generated_text"] == expected


def test_return_full_text(client: httpx.Client) -> None:
    short = generate(client, "The list", max_new_tokens=4)["generated_text"]
    full = generate(client, "The list", max_new_tokens=4, return_full_text=True)["generated_text"]
    assert full == "The list" + short


def test_concurrent_greedy_equals_alone(client: httpx.Client, server: Server) -> None:
    """24 prompts of very different lengths decoded in one batch give what each gives alone."""
    alone = [generate(client, p, max_new_tokens=16)["generated_text"] for p in PROMPTS]

    def one(prompt: str) -> str:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return generate(c, prompt, max_new_tokens=16)["generated_text"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(one, PROMPTS))
    assert together == alone


def test_seeded_sampling_is_reproducible_across_batches(client: httpx.Client, server: Server) -> None:
    params = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_k": 50, "seed": 1234, "details": True}
    alone = generate(client, "The list", **params)
    assert alone["details"]["seed"] == 1234

    def noisy(i: int) -> dict:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            if i == 0:
                return generate(c, "The list", **params)
            return generate(c, PROMPTS[i], max_new_tokens=12, do_sample=True, top_p=0.8, seed=i)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(noisy, range(8)))
    assert results[0]["generated_text"] == alone["generated_text"]
    other_seed = generate(client, "The list", **{**params, "seed": 99})
    assert other_seed["details"]["tokens"] != alone["details"]["tokens"]


def test_unseeded_sampling_reports_its_seed(client: httpx.Client) -> None:
    out = generate(client, "The list", max_new_tokens=6, do_sample=True, details=True)
    seed = out["details"]["seed"]
    assert isinstance(seed, int)
    again = generate(client, "The list", max_new_tokens=6, do_sample=True, seed=seed, details=True)
    assert again["generated_text"] == out["generated_text"]


def test_stop_sequence_across_token_boundaries(client: httpx.Client) -> None:
    full = generate(client, "The list", max_new_tokens=20, details=True)
    text = full["generated_text"]
    tokens = [t["text"] for t in full["details"]["tokens"]]
    # A stop string made of the end of one token and the start of the next.
    boundary = len(tokens[0]) + len(tokens[1])
    stop = text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and stop in text
    out = generate(client, "The list", max_new_tokens=20, stop=[stop], details=True)
    assert out["details"]["finish_reason"] == "stop_sequence"
    # As in TGI, the stop sequence stays in generated_text; the token texts join to it.
    assert out["generated_text"] == text[: text.index(stop) + len(stop)]
    assert "".join(t["text"] for t in out["details"]["tokens"]) == out["generated_text"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"inputs": "", "parameters": {}}, "inputs"),
        ({"inputs": "hi", "parameters": {"temperature": 0, "do_sample": True}}, "temperature"),
        ({"inputs": "hi", "parameters": {"temperature": -1}}, "temperature"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "top_p"),
        ({"inputs": "hi", "parameters": {"top_p": 0}}, "top_p"),
        ({"inputs": "hi", "parameters": {"top_k": 0}}, "top_k"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": "many"}}, "max_new_tokens"),
        ({"inputs": 42}, "inputs"),
        ({"inputs": ["a", "b"]}, "inputs"),
        ({"parameters": {}}, "inputs"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 100000}}, "max_new_tokens"),
        ({"inputs": "word " * 400, "parameters": {}}, "inputs"),
        ({"inputs": "hi", "parameters": {"stop": ["a"] * 9}}, "stop"),
        ({"inputs": "hi", "parameters": {"stop": [""]}}, "stop"),
        ({"inputs": "hi", "parameters": {"min_new_tokens": 9, "max_new_tokens": 3}}, "min_new_tokens"),
        ({"inputs": "hi", "parameters": {"watermark": True}}, "watermark"),
    ],
)
def test_validation_errors(client: httpx.Client, body: dict, needle: str) -> None:
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert set(payload) == {"error", "error_type"}
    assert payload["error_type"] == "validation"
    assert needle in payload["error"]


def test_limits_are_named_in_errors(client: httpx.Client) -> None:
    info = client.get("/info").json()
    r = client.post("/generate", json={"inputs": "word " * 400})
    assert str(info["max_input_tokens"]) in r.json()["error"]
    r = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 100000}})
    assert str(info["max_total_tokens"]) in r.json()["error"]


def test_malformed_json_is_422(client: httpx.Client) -> None:
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"


def test_unknown_parameters_are_ignored(client: httpx.Client) -> None:
    out = generate(client, "The list", max_new_tokens=3, adapter_id=None, grammar=None, some_future_flag=True)
    assert out["generated_text"]


def test_compat_route(client: httpx.Client) -> None:
    direct = generate(client, "The list", max_new_tokens=5)
    r = client.post("/", json={"inputs": "The list", "parameters": {"max_new_tokens": 5}, "stream": False})
    assert r.status_code == 200
    assert r.json() == direct


def test_concurrent_requests_all_answered(server: Server) -> None:
    def one(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/generate", json={"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {"max_new_tokens": 8}})
            return r.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [200] * 48

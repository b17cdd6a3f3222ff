"""vLLM's tokenizer routes beside TGI's on a real `textgen serve` (stories260k: SentencePiece with
BOS), told apart by their fields: `/tokenize` {prompt | messages} -> {tokens, count,
max_model_len, token_strs}, `/detokenize` -> {prompt} beside {text, count}, `/tokenizer_info`;
and lm-evaluation-harness `local-completions` with no `tokenizer` argument, which then uses them."""

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from tests.e2e.server import Server, start, stop
from tests.e2e.test_event_loop import BIG, probe_health

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def srv(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("tokenizer-routes")
    template = logs / "template.jinja"
    template.write_text(TEMPLATE)
    server = start(stories260k_dir, env={"TEXTGEN_CHAT_TEMPLATE": str(template)}, log_dir=logs)
    yield server
    stop(server.process)


@pytest.fixture(scope="module")
def tok(stories260k_dir: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(stories260k_dir)


def post(srv: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, timeout=60)


def test_vllm_tokenize_prompt(srv: Server, tok) -> None:  # noqa: ANN001
    limit = httpx.get(f"{srv.url}/info").json()["max_total_tokens"]
    text = "Once upon a time, 你好"
    out = post(srv, "/tokenize", {"prompt": text}).json()
    ids = tok(text)["input_ids"]
    assert out == {"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": None}
    assert ids[0] == tok.bos_token_id
    bare = post(srv, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
    assert bare["tokens"] == ids[1:] and bare["token_strs"] == tok.convert_ids_to_tokens(ids[1:])
    # lm-eval's probe: add_special_tokens false, a special token's text is that token.
    assert post(srv, "/tokenize", {"prompt": tok.eos_token, "add_special_tokens": False}).json()["tokens"] == [
        tok.eos_token_id
    ]


def test_vllm_tokenize_messages(srv: Server, tok) -> None:  # noqa: ANN001
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = post(srv, "/tokenize", {"messages": messages}).json()
    assert out["tokens"] == ids and out["count"] == len(ids)
    assert ids.count(tok.bos_token_id) == 1  # the template's own BOS only (add_special_tokens defaults false)
    extra = post(srv, "/tokenize", {"messages": messages, "add_special_tokens": True}).json()
    assert extra["tokens"] == [tok.bos_token_id, *ids]
    open_ended = post(
        srv, "/tokenize", {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    ).json()
    assert tok.decode(open_ended["tokens"]).endswith("Hi there")


def test_tgi_tokenize_keeps_its_shape(srv: Server, tok) -> None:  # noqa: ANN001
    out = post(srv, "/tokenize", {"inputs": "Once upon"}).json()
    assert set(out) == {"tokens", "count", "max_input_tokens"}
    assert [t["id"] for t in out["tokens"]] == tok("Once upon")["input_ids"]
    assert "".join(t["text"] for t in out["tokens"]) == "Once upon"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": "a", "prompt": "a"}, "prompt"),
        ({"add_special_tokens": True}, "inputs"),
    ],
)
def test_ambiguous_or_refused_bodies_are_422(srv: Server, body: dict, field: str) -> None:
    """In TGI's shape when the body could be TGI's; vLLM-only bodies: see test_first_use.py."""
    r = post(srv, "/tokenize", body)
    assert r.status_code == 422, r.text
    assert f"`{field}`" in r.json()["error"] and r.json()["error_type"] == "validation"


def test_a_2mb_message_is_refused_without_stalling_health(srv: Server) -> None:
    times: list[float] = []
    stop_probe = threading.Event()
    prober = threading.Thread(target=probe_health, args=(srv.url, stop_probe, times))
    prober.start()
    try:
        time.sleep(0.1)
        r = post(srv, "/tokenize", {"messages": [{"role": "user", "content": BIG}]})
    finally:
        stop_probe.set()
        prober.join(30)
    assert r.status_code == 400 and "`messages` is " in r.json()["error"]["message"], r.text[:300]  # vLLM's shape
    assert len(times) >= 5 and max(times) <= 0.3, f"/health took {max(times):.3f} s while /tokenize ran"


def test_model_field_is_checked(srv: Server) -> None:
    model = httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"]
    assert post(srv, "/tokenize", {"model": model, "prompt": "a"}).status_code == 200
    r = post(srv, "/tokenize", {"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]  # vLLM's shape
    assert post(srv, "/detokenize", {"model": "nope", "tokens": [1]}).status_code == 404


def test_detokenize_answers_both_shapes(srv: Server, tok) -> None:  # noqa: ANN001
    ids = tok("Once upon a time")["input_ids"] + [tok.eos_token_id]
    out = post(srv, "/detokenize", {"tokens": ids}).json()
    assert out == {"text": tok.decode(ids, skip_special_tokens=True), "count": len(ids), "prompt": tok.decode(ids)}
    assert out["prompt"].startswith(tok.bos_token) and out["prompt"].endswith(tok.eos_token)
    limit = httpx.get(f"{srv.url}/info").json()["max_total_tokens"]
    r = post(srv, "/detokenize", {"tokens": [5] * (limit + 1)})
    assert r.status_code == 422 and "`tokens`" in r.json()["error"]


def test_tokenizer_info(srv: Server, tok) -> None:  # noqa: ANN001
    info = httpx.get(f"{srv.url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["tokenizer_class"] == type(tok).__name__
    assert info["chat_template"] == TEMPLATE
    assert info["added_tokens_decoder"][str(tok.eos_token_id)] == tok.eos_token
    assert not {"name_or_path", "vocab_file", "merges_file", "tokenizer_file"} & set(info)  # no server paths


def test_lm_eval_without_a_tokenizer_uses_the_server(
    srv: Server, stories260k_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no `tokenizer` argument the harness probes /tokenizer_info and /tokenize, tokenizes
    through the server, and scores exactly as with the model's own tokenizer."""
    pytest.importorskip("lm_eval", reason="lm-eval[api] is in the dev extra: pip install -e '.[dev]'")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", os.environ.get("OPENAI_API_KEY", "unused"))
    model = httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"]
    base = {"model": model, "base_url": f"{srv.url}/v1/completions", "max_length": 256, "num_concurrent": 1}

    def run(args: dict) -> dict:
        out = simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=["textgen_mc", "textgen_rolling"],
            task_manager=TaskManager(include_path=str(ROOT / "tests/e2e/lm_eval_tasks"), include_defaults=False),
            log_samples=False,
        )
        return out["results"]

    before = srv.log().count('"route": "/tokenize"')
    remote = run(base)
    assert srv.log().count('"route": "/tokenizer_info"') >= 1
    assert srv.log().count('"route": "/tokenize"') > before + 1  # the probe and the requests' texts
    local = run(base | {"tokenizer": str(stories260k_dir), "tokenizer_backend": "huggingface"})
    assert remote["textgen_mc"]["acc,none"] == local["textgen_mc"]["acc,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert remote["textgen_rolling"][metric] == pytest.approx(local["textgen_rolling"][metric], rel=1e-6)
    assert 1 < remote["textgen_rolling"]["word_perplexity,none"] < float("inf")

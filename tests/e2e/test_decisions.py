"""POST /v1/decisions through the official `openai` SDK against a real `textgen serve`, on
stories260k (completion-style prompt, with a LoRA adapter) and on a GPT-2-tokenizer model with a
chat template.

The reference is computed in-process on the same token ids (app/decisions/prompt.encode): one
forward of the served model over prompt + option, alone (no batch, no prefix cache), and the same
log-softmax the engine takes. The server's answers must equal it bitwise: it batches options of
many requests and reads the prompt from the prefix cache, and the engine is batch invariant with
cache hits bitwise equal to misses (docs/performance.md, "Performance, precision and batch invariance"). The
transformers forward is only within 1e-4 of it (other GEMM kernels and attention calls: see
docs/api.md's "Decisions" section), which is checked too.
"""

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai.types import Decision
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from app.decisions.prompt import encode
from app.decisions.questions import parse_input, parse_questions
from app.decisions.score import answer, normalise
from app.engine.core.sequence import Sequence
from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
from app.engine.load.loader import LoadedModel, load_model
from app.engine.models.lora import read_adapter
from app.engine.runner.compact_batch import CompactBatch
from tests.adapters import build_adapter
from tests.e2e.server import Server, start, stop

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

STORY = "Tom lost his red ball in the park. He looked everywhere and he was very sad."
QUESTIONS: list[dict[str, Any]] = [
    {"type": "predicate", "name": "sad", "instructions": "Tom is sad."},
    {
        "type": "choice",
        "name": "place",
        "instructions": [{"type": "input_text", "text": "Where did Tom lose the ball?"}],
        "choices": [
            {"value": "park", "description": "a park"},
            {"value": "school"},
            {"value": "true"},
            {"value": True},
            {"value": False},
        ],
    },
    {
        "type": "score",
        "instructions": "How sad is Tom?",
        "levels": [{"label": "not sad"}, {"label": "a bit sad"}, {"label": "very sad", "description": "crying"}],
    },
]


@pytest.fixture(scope="module")
def gpt2_chat_dir(gpt2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random GPT-2 over the real GPT-2 tokenizer, with a ChatML template."""
    out = tmp_path_factory.mktemp("gpt2-chat")
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=4)
    config.bos_token_id = config.eos_token_id = tok.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(stories260k_dir, tmp_path_factory.mktemp("adapter"), ["q_proj", "v_proj"], 4, seed=3, std=0.1)


@pytest.fixture(scope="module")
def stories(stories260k_dir: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "TEXTGEN_LORA_ADAPTERS": f"tuned={adapter_dir}",
        "TEXTGEN_DECISIONS_MAX_QUESTIONS": "4",
        "TEXTGEN_DECISIONS_MAX_OPTIONS": "6",
        "TEXTGEN_MAX_INPUT_TOKENS": "400",
        "TEXTGEN_MAX_TOTAL_TOKENS": "512",
    }
    srv = start(stories260k_dir, env=env, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop(srv.process)


@pytest.fixture(scope="module")
def gpt2_chat(gpt2_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(gpt2_chat_dir, env={"TEXTGEN_MAX_QUEUE": "12"}, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop(srv.process)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300, max_retries=0)


def model_of(server: Server) -> str:
    return client(server).models.list().data[0].id


@torch.inference_mode()
def reference(path: Path, body: dict[str, Any], adapter: Path | None = None) -> list[dict[str, Any]]:
    """The answers computed in-process from one forward per prompt + option (see the docstring)."""
    lm: LoadedModel = load_model(str(path))
    assert lm.compact is not None and lm.forward_options is not None
    tok = lm.tokenizer
    loaded = read_adapter("tuned", str(adapter), lm.compact, 64) if adapter is not None else None
    questions = parse_questions(body["questions"], 64, 64)
    value = parse_input(body["input"])
    answers = []
    for q in questions:
        e = encode(tok, tok.chat_template, value, q)
        sums = []
        for option in e.options:
            ids = e.prompt + option
            request = GenerationRequest(ids, SamplingParams(), StoppingParams(1), lambda _: None, True)
            seq = Sequence(request, tok, frozenset(), frozenset(), 10_000, torch.device("cpu"), loaded)
            _, _, full = CompactBatch.prefill(lm.compact, lm.forward_options, [seq], all_logits=True)
            assert full is not None
            rows = torch.log_softmax(full[0, :-1].float(), dim=-1)
            chosen = rows.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].clamp(min=-1e4).tolist()
            sums.append(sum(chosen[len(e.prompt) - 1 :]))
            if loaded is None:  # transformers' own forward: close, not bitwise (docs/api.md, "Decisions")
                hf = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
                hf_sum = hf.gather(1, torch.tensor(ids[1:])[:, None])[len(e.prompt) - 1 :, 0].sum().item()
                assert abs(hf_sum - sums[-1]) < 1e-3 * len(option)
        answers.append(answer(q, normalise(sums)))
    return answers


def create(server: Server, body: dict[str, Any], model: str | None = None) -> Decision:
    return client(server).decisions.create(model=model or model_of(server), **body)


def check_answers(decision: Decision, body: dict[str, Any]) -> None:
    """The SDK's types, probabilities summing to 1, the argmax, the weighted mean, names echoed."""
    Decision.model_validate(decision.model_dump())
    assert len(decision.answers) == len(body["questions"])
    for a, q in zip(decision.answers, body["questions"], strict=True):
        assert a.type == q["type"] and a.name == q.get("name")
        if a.type == "predicate":
            assert 0 < a.probability < 1
            continue
        assert a.type in ("choice", "score")
        probs = [p.probability for p in a.probabilities]
        assert abs(math.fsum(probs) - 1) <= 1e-6
        best = max(range(len(probs)), key=lambda k: probs[k])
        assert a.confidence == probs[best]
        if a.type == "choice":
            assert a.choice == a.probabilities[best].value
            assert type(a.choice) is type(q["choices"][best]["value"])
            assert [p.value for p in a.probabilities] == [c["value"] for c in q["choices"]]
        else:
            assert a.score == pytest.approx(sum(k * p for k, p in enumerate(probs)), abs=1e-12)
            assert [(p.label, p.value) for p in a.probabilities] == [
                (level["label"], k) for k, level in enumerate(q["levels"])
            ]


def as_dicts(decision: Decision) -> list[dict[str, Any]]:
    return [a.model_dump() for a in decision.answers]


BODIES = {
    "string": {"input": STORY, "questions": QUESTIONS},
    "messages": {
        "input": [
            {"role": "developer", "content": "You read children's stories."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": STORY}]},
            {"type": "function_call", "call_id": "c1", "name": "find", "arguments": '{"what": "ball"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "not found"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "The ball is lost."}]},
            {"role": "user", "content": [{"type": "input_json", "data": {"mood": "sad"}}]},
        ],
        "questions": QUESTIONS[:2],
    },
}


@pytest.mark.parametrize("which", ["stories", "gpt2_chat"])
@pytest.mark.parametrize("kind", sorted(BODIES))
def test_answers_validate_and_equal_the_in_process_reference_bitwise(
    which: str, kind: str, request: pytest.FixtureRequest
) -> None:
    server: Server = request.getfixturevalue(which)
    path = Path(model_of(server))
    body = BODIES[kind]
    decision = create(server, body)
    check_answers(decision, body)
    assert as_dicts(decision) == reference(path, body)
    usage = decision.usage
    assert usage.input_tokens > 0 and usage.output_tokens == 0 and usage.total_tokens == usage.input_tokens
    again = create(server, body)  # the same prompt again: every option reads it from the cache
    assert as_dicts(again) == as_dicts(decision)
    assert again.usage.input_tokens == usage.input_tokens
    assert again.usage.input_tokens_details.cached_tokens > 0


def test_a_lora_adapter_answers_with_its_own_weights_alone_and_mixed_with_the_base(
    stories: Server, stories260k_dir: Path, adapter_dir: Path
) -> None:
    body = BODIES["string"]
    base = as_dicts(create(stories, body))
    tuned = as_dicts(create(stories, body, "tuned"))
    assert tuned != base
    assert tuned == reference(stories260k_dir, body, adapter_dir)
    # Interleaved: the adapter's prompt blocks never serve the base model's requests or back.
    got: dict[int, list[dict[str, Any]]] = {}

    def run(i: int) -> None:
        got[i] = as_dicts(create(stories, body, "tuned" if i % 2 else None))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(got[i] == (tuned if i % 2 else base) for i in range(6)), "answers changed when mixed"


def test_the_same_answers_come_back_alone_and_amid_16_concurrent_requests(stories: Server) -> None:
    body = BODIES["string"]
    alone = as_dicts(create(stories, body))
    others = [
        {
            "input": f"Story {i}: the cat sat on the mat and {'ran' if i % 2 else 'slept'} {i} times.",
            "questions": [QUESTIONS[i % 3]],
        }
        for i in range(16)
    ]
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        results[i] = as_dicts(create(stories, body if i == 16 else others[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 17
    assert results[16] == alone
    for i in range(16):
        assert results[i] == as_dicts(create(stories, others[i])), f"request {i} differs alone"


def _choice(values: list[Any]) -> dict[str, Any]:
    return {"type": "choice", "instructions": "Pick", "choices": [{"value": v} for v in values]}


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("empty questions", {"questions": []}, "questions"),
    ("too many questions", {"questions": [QUESTIONS[0]] * 5}, "questions"),
    ("one choice", {"questions": [_choice(["a"])]}, "questions.0.choices"),
    ("too many choices", {"questions": [_choice(list("abcdefg"))]}, "questions.0.choices"),
    ("duplicate values", {"questions": [QUESTIONS[0], _choice(["a", "b", "a"])]}, "questions.1.choices.2.value"),
    ("duplicate booleans", {"questions": [_choice([True, "x", True])]}, "questions.0.choices.2.value"),
    (
        "one level",
        {"questions": [{"type": "score", "instructions": "How?", "levels": [{"label": "low"}]}]},
        "questions.0.levels",
    ),
    ("empty instructions", {"questions": [{"type": "predicate", "instructions": "  "}]}, "questions.0.instructions"),
    (
        "empty instruction parts",
        {"questions": [{"type": "predicate", "instructions": []}]},
        "questions.0.instructions",
    ),
    ("unknown question type", {"questions": [{"type": "rank", "instructions": "x"}]}, "questions.0.type"),
    (
        "unknown question field",
        {"questions": [{"type": "predicate", "instructions": "x", "levels": []}]},
        "questions.0",
    ),
    ("unknown input item", {"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
    (
        "image input",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]},
        "input.0.content.0",
    ),
    (
        "image instructions",
        {"questions": [{"type": "predicate", "instructions": [{"type": "input_image", "image_url": "https://x/y"}]}]},
        "questions.0.instructions.0",
    ),
    (
        "output without a call",
        {"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]},
        "input.0.call_id",
    ),
    ("empty input", {"input": ""}, "input"),
    ("input too long", {"input": "the cat sat. " * 300}, "input"),
    ("prompt cache options", {"prompt_cache_options": {"mode": "explicit"}}, "prompt_cache_options"),
]


@pytest.mark.parametrize(("case", "change", "param"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_400_in_openais_shape_naming_the_field(
    stories: Server, case: str, change: dict[str, Any], param: str
) -> None:
    body = {"input": STORY, "questions": QUESTIONS[:1], **change}
    with pytest.raises(openai.BadRequestError) as info:
        create(stories, body)
    error = info.value.body
    assert isinstance(error, dict), error
    assert error["type"] == "invalid_request_error" and error["param"] == param, json.dumps(error)
    assert param.split(".")[0] in error["message"]


def test_unknown_fields_and_models_are_refused(stories: Server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(stories).decisions.create(
            model=model_of(stories), input=STORY, questions=QUESTIONS[:1], extra_body={"temperature": 0.5}
        )
    assert "temperature" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        create(stories, {"input": STORY, "questions": QUESTIONS[:1]}, model="no-such-model")


def test_more_options_than_the_queue_holds_is_a_400(gpt2_chat: Server) -> None:
    """Each option is one engine request: 16 options can never fit a queue of 12."""
    with pytest.raises(openai.BadRequestError) as info:
        create(gpt2_chat, {"input": STORY, "questions": [_choice(list("abcd"))] * 4})
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "questions"
    assert "TEXTGEN_MAX_QUEUE" in info.value.body["message"]

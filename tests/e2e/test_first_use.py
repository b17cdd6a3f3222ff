"""What a new user meets first, on the tiny GPT-2 (no chat template), through the official
clients: errors that say what to do instead, and limits reported consistently."""

import httpx
import openai
import pytest

from tests.e2e.server import Server


@pytest.fixture(scope="module")
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(oai: openai.OpenAI) -> str:
    return oai.models.list().data[0].id


def test_responses_without_a_chat_template_says_what_to_do(oai: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=model, input="Hi", max_output_tokens=4)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "input", error
    message = error["message"]
    # The route that also needs a template is no way out; the two that work are named.
    assert "/v1/chat/completions" not in message and "/v1/responses" in message, message
    assert "TEXTGEN_CHAT_TEMPLATE" in message and "/v1/completions" in message, message


def test_responses_input_of_the_wrong_type_names_input(oai: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=model, input=5, max_output_tokens=4)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "input", error


def test_tokenizer_info_reports_the_served_context(server: Server) -> None:
    """One number for the context everywhere: /tokenizer_info's `model_max_length` is the served
    max_total_tokens (as /tokenize's `max_model_len`), not the tokenizer file's 1024."""
    served = httpx.get(f"{server.url}/info", timeout=30).json()["max_total_tokens"]
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=30).json()
    tokenized = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hi"}, timeout=30).json()
    assert info["model_max_length"] == tokenized["max_model_len"] == served, (info["model_max_length"], served)


VLLM_BAD = [
    ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "messages"),  # no chat template here
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "Hi", "model": "nope"}, 404, "model"),
    ({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, 400, "messages"),
    ({"prompt": "Hi", "chat_template": "{{ x }}"}, 400, "chat_template"),
]


@pytest.mark.parametrize(("body", "status", "param"), VLLM_BAD)
def test_vllm_shaped_tokenize_errors_come_in_vllm_shape(server: Server, body: dict, status: int, param: str) -> None:
    r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
    body = r.json()
    assert r.status_code == status, r.text
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status and error["param"] == param, error
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError"), error


@pytest.mark.parametrize("body", [{"inputs": 5}, {"inputs": "Hi", "prompt": "Hi"}])
def test_tgi_shaped_tokenize_errors_keep_tgi_shape(server: Server, body: dict) -> None:
    r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
    assert r.status_code == 422 and set(r.json()) == {"error", "error_type"}, r.text

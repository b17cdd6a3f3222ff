"""Structured-output request fields of every route family, turned into one compiled grammar.

- OpenAI: `response_format` {"type": "json_object"} / {"type": "json_schema", "json_schema":
  {"schema": ...}}.
- vLLM: `structured_outputs` {"json" | "regex" | "choice" | "grammar" (Lark) | "json_object"} and
  the older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
- TGI: `parameters.grammar` {"type": "json" | "regex" | "json_schema", "value": ...}.

Grammars compile in a worker thread (never on the event loop or the engine thread) within
TEXTGEN_GRAMMAR_COMPILE_TIMEOUT; an invalid one is a 4xx naming the field and saying what is wrong.
"""

import asyncio
import json
from typing import Any

from starlette.concurrency import run_in_threadpool

from app.api.errors import validation
from app.api.generation import Context
from app.engine.core.constraints import Grammar, GrammarError, GrammarSpec
from app.engine.core.types import Completion

ANY_OBJECT = {"type": "object"}


def _json_spec(value: Any, field: str) -> GrammarSpec:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise validation(f"`{field}` is not valid JSON: {exc}", field) from None
    if not isinstance(value, dict | bool):
        raise validation(f"`{field}` must be a JSON schema (an object)", field)
    return GrammarSpec.json_schema(value)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise validation(f"`{field}` must be a non-empty string", field)
    return value


def _choice_spec(value: Any, field: str) -> GrammarSpec:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise validation(f"`{field}` must be a non-empty list of non-empty strings", field)
    return GrammarSpec.choice(value)


def response_format_spec(value: Any) -> GrammarSpec | None:
    """OpenAI's `response_format`; None for {"type": "text"}."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_schema(ANY_OBJECT)
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict):
            raise validation("`response_format.json_schema` must be an object with a `schema`", "response_format")
        schema = inner.get("schema", ANY_OBJECT)
        return _json_spec(schema, "response_format.json_schema.schema")
    raise validation(
        f"`response_format.type` {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
        "response_format",
    )


_VLLM_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def structured_outputs_spec(value: Any, field: str = "structured_outputs") -> GrammarSpec | None:
    """vLLM's `structured_outputs` object: exactly one of json, regex, choice, grammar, json_object."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise validation(f"`{field}` must be an object with one of: {', '.join(_VLLM_KINDS)}", field)
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    unknown = sorted(set(given) - set(_VLLM_KINDS))
    if unknown:
        raise validation(f"`{field}.{unknown[0]}` is not supported by this server; omit it or send null", field)
    if len(given) != 1:
        raise validation(f"`{field}` must set exactly one of: {', '.join(_VLLM_KINDS)}", field)
    kind, v = next(iter(given.items()))
    return _vllm(kind, v, f"{field}.{kind}")


def _vllm(kind: str, value: Any, field: str) -> GrammarSpec:
    if kind == "json":
        return _json_spec(value, field)
    if kind == "regex":
        return GrammarSpec("regex", _text(value, field))
    if kind == "choice":
        return _choice_spec(value, field)
    if kind == "grammar":
        return GrammarSpec("lark", _text(value, field))
    return GrammarSpec.json_schema(ANY_OBJECT)  # json_object: true


def openai_spec(body: Any) -> tuple[GrammarSpec | None, str]:
    """The one constraint an OpenAI-route body asks for, and the field that asked."""
    found: list[tuple[GrammarSpec, str]] = []
    if (spec := response_format_spec(body.response_format)) is not None:
        schema_given = body.response_format.get("type") == "json_schema"
        found.append((spec, "response_format.json_schema.schema" if schema_given else "response_format"))
    if (spec := structured_outputs_spec(body.structured_outputs)) is not None:
        kind = next(k for k in _VLLM_KINDS if body.structured_outputs.get(k) not in (None, False))
        found.append((spec, f"structured_outputs.{kind}"))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{kind}")
        if value is not None:
            found.append((_vllm(kind, value, f"guided_{kind}"), f"guided_{kind}"))
    if len(found) > 1:
        names = ", ".join(f"`{f.split('.')[0]}`" for _, f in found)
        raise validation(f"send one structured-output constraint, not several ({names})", found[1][1].split(".")[0])
    return found[0] if found else (None, "")


def tgi_spec(value: Any) -> GrammarSpec | None:
    """TGI's `parameters.grammar`."""
    field = "parameters.grammar"
    if value is None:
        return None
    if not isinstance(value, dict) or "value" not in value:
        raise validation(f'`{field}` must be {{"type": "json" | "regex", "value": ...}}', field)
    kind, v = value.get("type"), value["value"]
    if kind == "json":
        return _json_spec(v, f"{field}.value")
    if kind == "json_schema":
        schema = v.get("schema") if isinstance(v, dict) else None
        return _json_spec(schema, f"{field}.value.schema")
    if kind == "regex":
        return GrammarSpec("regex", _text(v, f"{field}.value"))
    raise validation(f"`{field}.type` {kind!r} is not supported; use 'json', 'json_schema' or 'regex'", field)


async def compile_grammar(ctx: Context, spec: GrammarSpec | None, field: str) -> Grammar | None:
    """Compile in a worker thread within TEXTGEN_GRAMMAR_COMPILE_TIMEOUT (a 4xx past it: llguidance's
    own resource limits stop the abandoned compile soon after)."""
    if spec is None:
        return None
    service = ctx.service
    assert service.grammars is not None
    timeout = service.settings.grammar_compile_timeout
    try:
        grammar = await asyncio.wait_for(run_in_threadpool(service.grammars.compile, spec), timeout)
    except TimeoutError:
        raise validation(
            f"`{field}` did not compile within {timeout} s (TEXTGEN_GRAMMAR_COMPILE_TIMEOUT); send a simpler one",
            field,
        ) from None
    except GrammarError as exc:
        raise validation(f"`{field}` is invalid: {str(exc).strip()}", field) from None
    service.metrics.constrained_requests.labels(spec.kind).inc()
    return grammar


def document_cut(completion: Completion, grammar: Grammar | None) -> bool:
    """Whether a stop string (or stop token id) ended constrained output before its document was
    whole: the returned text, checked against the grammar, is only a prefix of a document. Every
    route family reports this like `max_tokens` truncation (OpenAI `length`), never as a normal
    stop, so a client can tell a cut JSON document from a finished one. Cost: tokenizing the text
    and one matcher step per token (llguidance, microseconds each)."""
    return completion.finish_reason == "stop_sequence" and grammar is not None and not grammar.accepts(completion.text)

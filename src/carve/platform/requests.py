"""From an HTTP request body to engine jobs: prompt text and token ids, token counts, caps, one job per choice.

Kept apart from the Serve deployments so every rule (chat template, max_tokens
cap, context length) is checked the same way with or without Ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from pydantic import ValidationError

from carve.artifact import AdapterRef
from carve.common.errors import error_field, error_lines
from carve.engine.batching import Job
from carve.engine.constraints import choice_grammar, compiled, json_object_grammar
from carve.engine.requests import EngineError, Grammar
from carve.engine.text import chat_prompt, encode_prompt, has_chat_template, longest_token_chars
from carve.engine.tool_calls import calls_grammar
from carve.platform.api import ChatCompletionRequest, CompletionRequest
from carve.platform.config import ServeConfig

GenerationBody = Union[CompletionRequest, ChatCompletionRequest]


class ApiError(Exception):
    """An error answered to the client as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError) -> ApiError:
    """422 naming every bad field (``messages.0.role: ...``)."""
    first_field = error_field(exc.errors()[0], empty="body")
    return ApiError(422, "invalid request: " + "; ".join(error_lines(exc)), param=first_field, code="invalid_field")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object body; malformed JSON or another JSON value -> 422 saying where."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(422, f"malformed JSON body{where}: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(422, "malformed JSON body: nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def validate(data: dict[str, Any], model: type[Any]) -> Any:
    """``data`` as ``model``; a bad field -> 422 naming it."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_body(raw: bytes, model: type[Any]) -> Any:
    """Parse a JSON body into ``model``; malformed JSON or a bad field -> 422 saying where."""
    return validate(parse_json_object(raw), model)


MAX_CHOICES = 256  # prompts x n in one request: each choice is one engine job


@dataclass(frozen=True)
class PlannedPrompt:
    """One prompt of a request: the text a client sees echoed, its token ids (what the engine runs), one job per choice."""

    text: str
    ids: tuple[int, ...]
    jobs: tuple[Job, ...]


def choice_seed(seed: Optional[int], choice: int) -> Optional[int]:
    """The seed of choice ``choice``: the request's own for the first, one derived from it for the others (None stays None)."""
    if seed is None or choice == 0:
        return seed
    digest = hashlib.sha256(f"carve-choice:{seed}:{choice}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def check_token_ids(ids: Sequence[int], vocab: int, param: str) -> None:
    """400 naming ``param`` when a token id is outside the tokenizer's vocabulary."""
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside this model's vocabulary (0..{vocab - 1})", param=param, code="invalid_token_id")


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The chat template over ``messages`` (as ChatMessage.template gives them); a model without one, or a template that refuses them, is a 400."""
    from jinja2 import TemplateError

    if not has_chat_template(tokenizer):
        raise ApiError(400, "this base model has no chat template: use /v1/completions with a prompt", param="messages")
    try:
        return chat_prompt(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise ApiError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None


def render_prompts(body: GenerationBody, tokenizer: Any, context: int, token_chars: int) -> list[tuple[str, tuple[int, ...]]]:
    """(text, token ids) of each prompt: /v1/completions' as given (ids used exactly), /v1/chat/completions' chat template.

    A text longer than ``context`` tokens of ``token_chars`` characters (the longest a token decodes to) is a 400
    before it is tokenized: a 10 MB prompt costs no tokenizer time.
    """

    def encoded(text: str, where: str) -> tuple[int, ...]:
        if len(text) > context * token_chars:
            raise ApiError(
                400, f"the {where} has {len(text)} characters, so at least {len(text) // token_chars} tokens: more than this model's "
                f"context of {context} tokens", param=where, code="context_length_exceeded",
            )
        return tuple(encode_prompt(tokenizer, text))

    if isinstance(body, ChatCompletionRequest):
        text = render_chat(tokenizer, body.prompt_messages())
        return [(text, encoded(text, "messages"))]
    prompts = body.prompt_list()
    rendered = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            rendered.append((prompt, encoded(prompt, "prompt" if len(prompts) == 1 else f"prompt.{i}")))
        else:
            check_token_ids(prompt, len(tokenizer), "prompt" if len(prompts) == 1 else f"prompt.{i}")
            rendered.append((tokenizer.decode(list(prompt)), tuple(prompt)))
    return rendered


def plan_request(
    body: GenerationBody, target: Optional[AdapterRef], tokenizer: Any, context: int, config: ServeConfig,
    mixture: tuple[tuple[Optional[AdapterRef], float], ...] = (), space: str = "output", token_chars: Optional[int] = None,
) -> list[PlannedPrompt]:
    """The engine jobs of a request, by prompt (``mixture``: its output-space branches).

    400 for max_tokens over the cap, a prompt over the context, too many choices, or a token id
    outside the vocabulary.
    """
    _check_combinations(body)
    requested = body.requested_max_tokens()
    max_tokens = config.default_max_tokens if requested is None else requested
    field = "max_completion_tokens" if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens else "max_tokens"
    if max_tokens > config.max_tokens_cap:
        raise ApiError(400, f"{field}={max_tokens} exceeds this server's cap of {config.max_tokens_cap}", param=field, code="max_tokens_over_cap")
    grammar = request_grammar(body)
    bias = body.logit_bias_pairs()
    check_token_ids([t for t, _ in bias], len(tokenizer), "logit_bias")
    rendered = render_prompts(body, tokenizer, context, token_chars or longest_token_chars(tokenizer))
    candidates = body.candidates()
    if len(rendered) * candidates > MAX_CHOICES:
        what, param = (f"best_of={candidates}", "best_of") if candidates != body.n else (f"n={body.n}", "n")
        raise ApiError(400, f"{len(rendered)} prompts x {what} is {len(rendered) * candidates} choices; at most {MAX_CHOICES} per request", param=param)
    logprobs = body.generated_logprobs()
    if candidates != body.n and logprobs is None:
        logprobs = 0  # best_of ranks the candidates by their tokens' logprobs
    echo = isinstance(body, CompletionRequest) and body.echo
    param = "prompt" if isinstance(body, CompletionRequest) else "messages"
    planned = []
    for i, (text, ids) in enumerate(rendered):
        where = param if len(rendered) == 1 else f"{param}.{i}"
        if not ids:
            raise ApiError(400, "the prompt has no tokens", param=where)
        if len(ids) + max_tokens > context:
            raise ApiError(
                400,
                f"this model's context is {context} tokens, but the request needs {len(ids) + max_tokens} "
                f"({len(ids)} in the {where}, {max_tokens} to generate); shorten the {param} or lower {field}",
                param=where,
                code="context_length_exceeded",
            )
        jobs = tuple(
            Job(
                prompt=ids, prompt_tokens=len(ids), adapter=target, max_new_tokens=max_tokens, temperature=body.temperature,
                top_p=body.top_p, seed=choice_seed(body.seed, c), stop=body.stop_list(), ignore_eos=body.ignore_eos,
                mixture=mixture, space=space, frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                logit_bias=bias, logprobs=logprobs, grammar=grammar,
                prompt_logprobs=body.logprobs if echo and body.logprobs is not None else None,  # type: ignore[union-attr]
            )
            for c in range(candidates)
        )
        planned.append(PlannedPrompt(text, ids, jobs))
    return planned


def request_grammar(body: GenerationBody) -> Optional[Grammar]:
    """The grammar the answer must follow (``response_format`` json, or the ``structured_outputs`` extension); 400 when it does not compile."""
    fmt, structured = body.response_format, body.structured_outputs
    if fmt is not None and fmt.type != "text" and structured is not None:
        raise ApiError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    calls_required = isinstance(body, ChatCompletionRequest) and body.calling() == "required"
    if calls_required and ((fmt is not None and fmt.type != "text") or structured is not None):
        raise ApiError(400, "a required tool call already constrains the reply: drop response_format / structured_outputs", param="tool_choice")
    if calls_required:
        grammar, param = calls_grammar(body.callable_functions(), body.parallel_tool_calls), "tools"  # type: ignore[union-attr]
    elif fmt is not None and fmt.type == "json_object":
        grammar, param = json_object_grammar(), "response_format"
    elif fmt is not None and fmt.json_schema is not None:
        grammar, param = Grammar("json_schema", json.dumps(fmt.json_schema.json_schema)), "response_format.json_schema.schema"
    elif structured is None:
        return None
    elif structured.json_schema is not None:
        source = structured.json_schema
        grammar, param = Grammar("json_schema", source if isinstance(source, str) else json.dumps(source)), "structured_outputs.json"
    elif structured.regex is not None:
        grammar, param = Grammar("regex", structured.regex), "structured_outputs.regex"
    elif structured.choice is not None:
        grammar, param = choice_grammar(structured.choice), "structured_outputs.choice"
    else:
        grammar, param = Grammar("lark", structured.grammar or ""), "structured_outputs.grammar"
    if body.stop:
        raise ApiError(400, "stop sequences would cut a constrained answer short of its grammar: drop stop", param="stop")
    try:
        compiled(grammar)
    except EngineError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_grammar") from None
    return grammar


def _check_combinations(body: GenerationBody) -> None:
    """400 naming the field for settings that are valid alone but not together."""
    if isinstance(body, CompletionRequest) and body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens 0 only makes sense with echo (the prompt alone): give at least 1", param="max_tokens")
    if isinstance(body, CompletionRequest) and body.best_of is not None and body.best_of < body.n:
        raise ApiError(400, f"best_of={body.best_of} is less than n={body.n}: best_of candidates give the n best", param="best_of")
    if isinstance(body, CompletionRequest) and body.stream and body.candidates() != body.n:
        raise ApiError(400, "best_of > n cannot stream: the best candidates are known only when all have finished", param="best_of")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if isinstance(body, ChatCompletionRequest) and body.tool_choice not in (None, "none") and not body.tools:
        raise ApiError(400, "tool_choice needs tools to choose from", param="tool_choice")
    if isinstance(body, ChatCompletionRequest) and body.tools and not body.callable_functions():
        raise ApiError(400, f"tool_choice names a function that is not among the tools: {body.tool_choice.function.name!r}", param="tool_choice")  # type: ignore[union-attr]



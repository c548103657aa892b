"""From an HTTP request body to an engine job: prompt text, token counts, caps.

Kept apart from the Serve deployments so every rule (chat template, max_tokens
cap, context length) is checked the same way with or without Ray.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import ValidationError

from carve.artifact import AdapterRef
from carve.common.errors import error_field, error_lines
from carve.engine.batching import Job
from carve.engine.text import chat_prompt, count_prompt_tokens, has_chat_template
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


def parse_body(raw: bytes, model: type[Any]) -> Any:
    """Parse a JSON body into ``model``; malformed JSON or a bad field -> 422 saying where."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(422, f"malformed JSON body{where}: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def render_prompt(body: GenerationBody, tokenizer: Any) -> str:
    """/v1/completions: the prompt as is; /v1/chat/completions: the chat template over the messages."""
    if isinstance(body, CompletionRequest):
        return body.prompt_text()
    if not has_chat_template(tokenizer):
        raise ApiError(400, "this base model has no chat template: use /v1/completions", param="messages")
    return chat_prompt(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])


def build_job(
    body: GenerationBody, target: Optional[AdapterRef], tokenizer: Any, context: int, config: ServeConfig,
    mixture: tuple[tuple[Optional[AdapterRef], float], ...] = (), space: str = "output",
) -> Job:
    """The engine job of a request (``mixture``: its output-space branches), refusing max_tokens over the cap or a prompt over the context (400)."""
    max_tokens = body.requested_max_tokens() or config.default_max_tokens
    field = "max_completion_tokens" if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens else "max_tokens"
    if max_tokens > config.max_tokens_cap:
        raise ApiError(400, f"{field}={max_tokens} exceeds this server's cap of {config.max_tokens_cap}", param=field, code="max_tokens_over_cap")
    prompt = render_prompt(body, tokenizer)
    prompt_tokens = count_prompt_tokens(tokenizer, prompt)
    if prompt_tokens == 0:
        raise ApiError(400, "the prompt has no tokens", param="prompt")
    if prompt_tokens + max_tokens > context:
        param = "prompt" if isinstance(body, CompletionRequest) else "messages"
        raise ApiError(
            400,
            f"this model's context is {context} tokens, but the request needs {prompt_tokens + max_tokens} "
            f"({prompt_tokens} in the prompt, {max_tokens} to generate); shorten the {param} or lower {field}",
            param=param,
            code="context_length_exceeded",
        )
    return Job(
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        adapter=target,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
        mixture=mixture,
        space=space,
    )

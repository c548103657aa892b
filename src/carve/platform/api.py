"""The HTTP API's request and response bodies, shaped like OpenAI's so its clients work unchanged.

Requests forbid unknown fields (OpenAI does too), so a misspelt parameter is a
422 naming it rather than a silently ignored setting. Responses carry one
extra field, ``carve``, naming the adapter(s) that produced the text.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length"]


class _Request(BaseModel):
    """Sampling fields shared by both generation endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, description="Only 1 is supported.")
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    user: Optional[str] = None
    ignore_eos: bool = Field(False, description="Extension (as in vLLM): decode exactly max_tokens, for benchmarks.")
    carve: Optional[Dict[str, Any]] = Field(None, description="Extension: routing options ({mix: {...}} or {auto: {top_k}}, space); see carve.router.")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Union[str, List[str], None]) -> Union[str, List[str], None]:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stop

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class CompletionRequest(_Request):
    """POST /v1/completions: the prompt is sent to the model as is."""

    prompt: Union[str, List[str]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Union[str, List[str]]) -> Union[str, List[str]]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"give one prompt (a string), got a list of {len(prompt)}")
        text = prompt if isinstance(prompt, str) else prompt[0]
        if not text:
            raise ValueError("prompt is empty")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Union[str, List[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions: messages go through the tokenizer's chat template."""

    messages: List[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses -------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AdapterUse(BaseModel):
    name: str
    version: int
    weight: float = 1.0


class CarveInfo(BaseModel):
    """Which adapters produced a response (empty for the base model), and the routing decision behind it."""

    adapters: List[AdapterUse] = Field(default_factory=list)
    mode: Optional[str] = None  # explicit | auto | mixture | base
    space: Optional[str] = None  # output | weights (mixtures)
    confidence: Optional[float] = None  # auto: the chosen adapter's confidence
    reason: Optional[str] = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[FinishReason]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None
    carve: CarveInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Optional[FinishReason]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage
    carve: CarveInfo


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Optional[FinishReason] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None
    carve: Optional[CarveInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "carve"
    carve: Dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- operator API ----------------------------------------------------------


class RegisterAdapter(BaseModel):
    """POST /v1/adapters with JSON: register an adapter folder that is on the server."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64)
    path: str = Field(..., min_length=1)
    tags: List[str] = Field(default_factory=list)
    card: Optional[Dict[str, Any]] = None


class AdapterInfo(BaseModel):
    name: str
    version: int
    tags: List[str]
    base_model_id: Optional[str] = None
    rank: Optional[int] = None
    alpha: Optional[float] = None
    target_modules: List[str] = Field(default_factory=list)
    path: str
    created_at: Optional[str] = None
    card: Optional[Dict[str, Any]] = None


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: List[AdapterInfo]


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()

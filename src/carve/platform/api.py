"""The HTTP API's request and response bodies, shaped like OpenAI's so its clients work unchanged.

Requests forbid unknown fields (OpenAI does too), so a misspelt parameter is a
422 naming it rather than a silently ignored setting. Responses carry one
extra field, ``carve``, naming the adapter(s) that produced the text.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from carve.engine.tool_calls import Call, Function, call_text, result_text, tools_prompt

FinishReason = Literal["stop", "length", "tool_calls"]
MAX_LOGPROBS = 20  # OpenAI's limit for logprobs (completions) and top_logprobs (chat)
TokenIds = List[Annotated[int, Field(ge=0)]]


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: the schema the answer follows (decoding is constrained to it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., min_length=1, max_length=64)
    description: Optional[str] = None
    json_schema: Dict[str, Any] = Field(default_factory=dict, alias="schema")  # absent: any JSON value
    strict: Optional[bool] = None  # decoding always holds the schema; accepted for OpenAI's clients


class ResponseFormat(BaseModel):
    """OpenAI's: plain text, any JSON object, or JSON following a schema; the last two constrain decoding."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self


class StructuredOutputs(BaseModel):
    """Extension (vLLM's ``structured_outputs``): the answer constrained to exactly one of a JSON schema, a regex, a choice or a Lark grammar."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: Optional[Union[Dict[str, Any], str]] = Field(None, alias="json")
    regex: Optional[str] = Field(None, min_length=1)
    choice: Optional[List[Annotated[str, Field(min_length=1)]]] = Field(None, min_length=1)
    grammar: Optional[str] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, regex, choice, grammar (got {len(given)})")
        return self


class _Request(BaseModel):
    """Sampling fields shared by both generation endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128, description="Choices per prompt; choice i samples with a seed derived from `seed`.")
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**63)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[Dict[str, float]] = Field(None, description="Token id (as a string) -> bias in [-100, 100], added to its log-probability.")
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = Field(None, description="Extension (as in vLLM): constrain the answer to a JSON schema, regex, choice or Lark grammar.")
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    user: Optional[str] = None
    ignore_eos: bool = Field(False, description="Extension (as in vLLM): decode exactly max_tokens, for benchmarks.")
    carve: Optional[Dict[str, Any]] = Field(None, description="Extension: routing options ({mix: {...}} or {auto: {top_k}}, space); see carve.router.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Union[str, List[str], None]) -> Union[str, List[str], None]:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, bias: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"token {key}: the bias must be in [-100, 100], got {value}")
        return bias

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def generated_logprobs(self) -> Optional[int]:
        """How many alternatives to return with each generated token's logprob (None: no logprobs)."""
        return None

    def candidates(self) -> int:
        """Completions decoded per prompt (``best_of`` of them when given, else ``n``)."""
        return self.n


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


Prompt = Union[str, TokenIds]


class CompletionRequest(_Request):
    """POST /v1/completions: each prompt (text, or token ids used exactly) is sent to the model as is."""

    prompt: Union[str, List[str], TokenIds, List[TokenIds]]
    max_tokens: Optional[int] = Field(None, ge=0, description="0 with echo: the prompt only (scored when logprobs is set).")
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=128, description="Candidates per prompt; the n of highest total logprob are returned.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, prompt: Any) -> Any:
        """One of OpenAI's four prompt shapes, with no empty prompt (a clearer error than the union's four)."""

        def ids(value: Any) -> bool:
            return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

        if isinstance(prompt, str) or (ids(prompt) and prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or all(ids(p) for p in prompt)):
            prompts = prompt
        else:
            raise ValueError("give a string, a list of strings, a list of token ids or a list of token-id lists")
        if not prompts:
            raise ValueError("give at least one prompt")
        for i, one in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt {i}"
            if len(one) == 0:
                raise ValueError(f"{where} is empty")
            if not isinstance(one, str) and min(one) < 0:
                raise ValueError(f"{where}: token ids are >= 0, got {min(one)}")
        return prompt

    def prompt_list(self) -> list[Prompt]:
        """The prompts: one per string or token-id list."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def prompt_text(self) -> str:
        """The first text prompt (what the router reads); empty when the prompts are token ids."""
        return next((p for p in self.prompt_list() if isinstance(p, str)), "")

    def generated_logprobs(self) -> Optional[int]:
        return self.logprobs

    def candidates(self) -> int:
        return self.best_of or self.n


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are a JSON object as text: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"arguments are a JSON object as text, got a {type(value).__name__}")
        return arguments


class ToolCall(BaseModel):
    """A call the assistant made (in a reply, or sent back in the conversation)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A message; ``type`` ("message", as the Responses API and lm-eval's chat turns send it) and ``name`` are accepted.

    Function calling: an assistant message may carry ``tool_calls`` (content then optional), a ``tool``
    message answers one by its ``tool_call_id``.
    """

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None
    name: Optional[str] = None
    type: Optional[Literal["message", "text"]] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None
    # what the openai client's model_dump() of a reply carries: accepted when null, so a reply goes back as history
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _roles_and_their_fields(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role}")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs its tool_call_id, and only a tool message has one")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"only text content parts are supported (this model reads text), got type {kind!r}")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def template(self) -> dict[str, str]:
        """The message as the chat template sees it: text content; OpenAI's ``developer`` is its newer name for ``system``.

        Calls and tool results are written as text (carve.engine.tool_calls), a result in a user turn,
        which every chat template accepts.
        """
        if self.role == "tool":
            return {"role": "user", "content": result_text(self.text())}
        calls = "".join(call_text(Call(c.function.name, c.function.arguments)) for c in self.tool_calls or ())
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text() + calls}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Dict[str, Any] = Field(default_factory=dict, description="The arguments' JSON schema (absent: any object).")
    strict: Optional[bool] = None  # a required call always follows the schema; accepted for OpenAI's clients


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions: messages go through the tokenizer's chat template."""

    messages: List[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[List[Tool]] = Field(None, max_length=128)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def generated_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        """The conversation as the chat template sees it (what the router reads).

        The results of parallel calls, one tool message each, become one user turn: templates that
        want user and assistant turns to alternate accept the history."""
        messages: list[dict[str, str]] = []
        after_tool = False
        for message in self.messages:
            turn = message.template()
            if message.role == "tool" and after_tool:
                messages[-1] = {"role": "user", "content": messages[-1]["content"] + "\n" + turn["content"]}
            else:
                messages.append(turn)
            after_tool = message.role == "tool"
        return messages

    def calling(self) -> Literal["none", "auto", "required"]:
        """Whether the reply may call a tool (auto), must (required, or a named function), or may not (none)."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "required"
        return self.tool_choice or "auto"

    def callable_functions(self) -> list[Function]:
        """The functions the reply may call: every tool's, or the named one's."""
        functions = [Function(t.function.name, t.function.description or "", t.function.parameters) for t in self.tools or ()]
        if isinstance(self.tool_choice, NamedToolChoice):
            return [f for f in functions if f.name == self.tool_choice.function.name]
        return functions

    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation the model reads: with tools it may call, their listing joins the system message."""
        messages = self.template_messages()
        if self.calling() == "none":
            return messages
        listing = tools_prompt(self.callable_functions())
        if messages[0]["role"] == "system":
            return [{"role": "system", "content": messages[0]["content"] + "\n\n" + listing}, *messages[1:]]
        return [{"role": "system", "content": listing}, *messages]


class TokenizeCompletion(BaseModel):
    """POST /tokenize with a prompt (vLLM's TokenizeCompletionRequest)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = Field(True, description="True: as /v1/completions encodes the prompt (its special tokens unless it starts with BOS).")
    return_token_strs: bool = False


class TokenizeChat(BaseModel):
    """POST /tokenize with messages (vLLM's TokenizeChatRequest): the chat template, then the tokens /v1/chat/completions sends."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    messages: List[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(True, description="True: as /v1/chat/completions encodes the rendered template.")
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: List[int]
    token_strs: Optional[List[str]] = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info: the tokenizer's configuration, as vLLM answers it (lm-eval's remote tokenizer reads it)."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    eos_token: Optional[str] = None
    bos_token: Optional[str] = None
    pad_token: Optional[str] = None
    chat_template: Optional[str] = None
    model_max_length: int
    vocab_size: int
    add_bos_token: bool = False


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


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: one entry per token of the choice's text (the prompt's too with echo).

    The first prompt token has no logprob (null); ``top_logprobs`` maps token text to logprob, the chosen
    token always among them (so up to logprobs + 1 entries); ``text_offset`` is each token's character
    offset in the choice's text.
    """

    tokens: List[str]
    token_logprobs: List[Optional[float]]
    top_logprobs: List[Optional[Dict[str, float]]]
    text_offset: List[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[FinishReason]
    logprobs: Optional[CompletionLogprobs] = None


class CompletionChunkChoice(BaseModel):
    """One choice's new text in a streamed completion; ``logprobs`` covers this chunk's tokens (offsets in the whole text)."""

    index: int = 0
    text: str = ""
    finish_reason: Optional[FinishReason] = None
    logprobs: Optional[CompletionLogprobs] = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChunkChoice]
    usage: Optional[Usage] = None
    carve: Optional[CarveInfo] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None
    carve: CarveInfo


class _WithoutAbsentCalls(BaseModel):
    """Serialized without ``tool_calls`` when there are none, as OpenAI's replies are."""

    @model_serializer(mode="wrap")
    def _drop_absent_calls(self, handler: Any) -> Any:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class AssistantMessage(_WithoutAbsentCalls):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[List[ToolCall]] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob]


class ChatLogprobs(BaseModel):
    """The chat shape: one entry per generated token, each with its ``top_logprobs`` alternatives."""

    content: Optional[List[ChatTokenLogprob]]
    refusal: Optional[List[ChatTokenLogprob]] = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Optional[FinishReason]
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage
    carve: CarveInfo


class ToolCallDelta(BaseModel):
    """A streamed call, whole in one chunk (sent once the reply has ended)."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatDelta(_WithoutAbsentCalls):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[List[ToolCallDelta]] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Optional[FinishReason] = None
    logprobs: Optional[ChatLogprobs] = None  # the tokens of this chunk, when the request asks for logprobs


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

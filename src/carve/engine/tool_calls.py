"""Function calling as text: how tools are shown to the model, how its calls are written, read back and constrained.

One format for every base (the Hermes convention many open chat models were
trained on): the tools are listed as JSON inside ``<tools></tools>`` in the
system message, and a call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
a tool's result comes back as ``<tool_response>...</tool_response>`` in a user
turn, which every chat template accepts. When a call is required (OpenAI's
``tool_choice: "required"`` or a named function) the reply is constrained to
calls whose arguments follow the function's JSON schema; with ``auto`` the
model chooses, and a reply's calls are read back by :class:`CallSplitter`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from carve.engine.requests import Grammar

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class Function:
    """A tool the model may call: its name, what it does, and the JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def listing(self) -> str:
        described = {"description": self.description} if self.description else {}
        return json.dumps({"type": "function", "function": {"name": self.name, **described, "parameters": dict(self.parameters)}})


@dataclass(frozen=True)
class Call:
    """One call the model wrote: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


def tools_prompt(functions: Sequence[Function]) -> str:
    """The system text that lists ``functions`` and says how to call them."""
    listing = "\n".join(f.listing() for f in functions)
    return (
        f"You may call these functions (JSON in <tools></tools>):\n<tools>\n{listing}\n</tools>\n"
        f'To call one, reply {CALL_OPEN}{{"name": <name>, "arguments": <JSON object>}}{CALL_CLOSE} for each call.'
    )


def call_text(call: Call) -> str:
    """A call as the assistant wrote it, for a conversation that carries earlier calls."""
    return f"{CALL_OPEN}{json.dumps({'name': call.name, 'arguments': json.loads(call.arguments)})}{CALL_CLOSE}"


def result_text(content: str) -> str:
    """A tool's result as the model reads it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def calls_grammar(functions: Sequence[Function], parallel: bool = True) -> Grammar:
    """One call (or, with ``parallel``, one or more) to one of ``functions``, its arguments following the function's schema."""
    one_of = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": dict(f.parameters) or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    compact = {"x-guidance": {"whitespace_flexible": False}}  # JSON as json.dumps writes it: no room to wander in whitespace
    schema = json.dumps({**one_of[0], **compact} if len(one_of) == 1 else {"anyOf": one_of, **compact})
    repeat = "+" if parallel else ""
    return Grammar("lark", f"start: call{repeat}\ncall: {json.dumps(CALL_OPEN)} %json {schema} {json.dumps(CALL_CLOSE)}")


def parse_calls(text: str, parallel: bool = True) -> tuple[str, list[Call]]:
    """The reply's text before its first call, and its well-formed calls (the first only unless ``parallel``);
    text without a readable call is all content."""
    calls: list[Call] = []
    for match in _CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(body, dict) and isinstance(body.get("name"), str) and isinstance(body.get("arguments", {}), dict):
            calls.append(Call(body["name"], json.dumps(body.get("arguments", {}))))
    if not calls:
        return text, []
    return text[: text.index(CALL_OPEN)], calls if parallel else calls[:1]


class CallSplitter:
    """A streamed reply split into content that can go out now and calls read once it ends.

    Text is released as content until ``<tool_call>`` could be starting; from
    there on it is held, and :meth:`finish` reads the held text's calls (held
    text with no readable call is released as content then).
    """

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel  # False: the first call only
        self.text = ""
        self.released = 0

    def feed(self, delta: str) -> str:
        """Content that is safe to send after ``delta`` arrived."""
        self.text += delta
        start = self.text.find(CALL_OPEN, self.released)
        if start == -1:  # hold a tail that may be the opening tag's beginning
            start = len(self.text)
            for k in range(min(len(CALL_OPEN) - 1, len(self.text) - self.released), 0, -1):
                if self.text.endswith(CALL_OPEN[:k]):
                    start -= k
                    break
        out = self.text[self.released : start]
        self.released = start
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """The rest of the content and the reply's calls, once the reply is whole."""
        content, calls = parse_calls(self.text, self.parallel)
        rest = content[self.released :] if calls else self.text[self.released :]
        self.released = len(self.text)
        return rest, calls

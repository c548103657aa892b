"""The OpenAI surface real clients need, through the official `openai` client against a real local Ray Serve app.

Every field is checked against the engine run directly (tiny model, real adapters):
prompts as text or token ids, n, echo and logprobs, penalties, logit_bias, seeds,
chat logprobs and content parts, the tokenizer endpoints, and the 4xx answers.

Run under the offline wrapper:
    ../shared/tools/offline .venv/bin/python -m pytest -q tests/test_openai_surface.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from live_server import carve_home, local_server

from carve.platform.responses import token_bytes, token_text

pytestmark = pytest.mark.ray

PROMPTS = ["The patient was treated with", "Revenue rose 12 percent", "Gene expression of"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> Iterator[str]:
    from carve.adapters.registry import Registry

    with carve_home(tmp_path_factory.mktemp("carve-home")) as home:
        registry = Registry(home / "registry")
        registry.add(tiny_adapters["alpha"], "alpha", tags=["bio"], base=str(tiny_model_dir))
        registry.add(tiny_adapters["beta"], "beta", tags=["fin"], base=str(tiny_model_dir))
        with local_server(
            tiny_model_dir, registry.root, max_adapters=2, num_cpus=2, engine_num_cpus=0, max_tokens_cap=64, default_max_tokens=16, batch_wait_s=0.05,
        ) as url:
            yield url


@pytest.fixture(scope="module")
def api(server: str) -> Any:
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def direct(reference, prompt: str | list[int], adapter: str | None, **sampling: Any):
    from carve.engine.decoding import GenerationRequest, Sampling

    settings = {"max_new_tokens": 8, **sampling}
    return reference.generate([GenerationRequest.single(prompt, adapter, Sampling(**settings))])[0]


def chat_text(reference, messages: list[dict[str, str]]) -> str:
    from carve.engine.text import chat_prompt

    return chat_prompt(reference.tokenizer, messages)


# -- /v1/completions ---------------------------------------------------------------


def test_prompts_as_strings_and_token_ids_are_choices_in_order(api, reference):
    ids = [reference.encode(p) for p in PROMPTS]
    by_ids = api.completions.create(model="alpha", prompt=ids, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in by_ids.choices] == list(range(6))
    for choice in by_ids.choices:
        assert choice.text == direct(reference, ids[choice.index // 2], "alpha").text
    assert by_ids.usage.prompt_tokens == sum(len(i) for i in ids)  # each prompt once, whatever n
    assert by_ids.usage.completion_tokens == 2 * sum(len(direct(reference, i, "alpha").token_ids) for i in ids)
    by_text = api.completions.create(model="alpha", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices[::2]]
    one = api.completions.create(model="bio", prompt=ids[1], max_tokens=8, temperature=0)
    assert one.choices[0].text == by_ids.choices[2].text and one.usage.prompt_tokens == len(ids[1])


def test_token_ids_are_used_exactly(api, reference):
    """Ids that are not what the text would tokenize to (a token split in two) reach the model as given."""
    odd = reference.tokenizer("T", add_special_tokens=False)["input_ids"] + reference.tokenizer("he patient", add_special_tokens=False)["input_ids"]
    assert odd != reference.encode("The patient")
    got = api.completions.create(model="base", prompt=odd, max_tokens=8, temperature=0)
    assert got.choices[0].text == direct(reference, odd, None).text and got.usage.prompt_tokens == len(odd)


def test_echo_with_logprobs_scores_every_prompt_token(api, reference):
    from carve.engine.scoring import score_prompts

    ids = reference.encode(PROMPTS[0])
    got = api.completions.create(model="alpha", prompt=[ids], echo=True, logprobs=3, max_tokens=1, temperature=0)
    choice = got.choices[0]
    generated = direct(reference, ids, "alpha", max_new_tokens=1)
    assert choice.text == reference.tokenizer.decode(ids) + generated.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = score_prompts(reference, [ids], ["alpha"], top_k=3)[0]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx([w.logprob for w in want[1:]], abs=1e-4)
    for position, top in enumerate(lp.top_logprobs[1:], start=1):
        assert lp.tokens[position] in top and 3 <= len(top) <= 4  # the top 3, and the chosen token always listed
    assert lp.tokens == [token_text(reference.tokenizer, t) for t in ids + generated.token_ids]
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-6)  # greedy: the best token
    assert lp.text_offset[0] == 0 and all(b >= a for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 1


def test_echo_with_zero_tokens_returns_the_prompt_only(api, reference):
    ids = reference.encode(PROMPTS[1])
    scored = api.completions.create(model="fin", prompt=[ids, reference.encode(PROMPTS[2])], echo=True, logprobs=0, max_tokens=0)
    first = scored.choices[0]
    assert first.text == reference.tokenizer.decode(ids) and len(first.logprobs.token_logprobs) == len(ids)
    assert all(len(top) == 1 for top in first.logprobs.top_logprobs[1:])  # logprobs 0: the chosen token alone
    assert scored.usage.completion_tokens == 0 and first.finish_reason == "length"
    plain = api.completions.create(model="fin", prompt=PROMPTS[1], echo=True, max_tokens=0)
    assert plain.choices[0].text == PROMPTS[1] and plain.choices[0].logprobs is None
    assert plain.usage.prompt_tokens == len(reference.encode(PROMPTS[1]))


def test_generated_token_logprobs(api, reference):
    got = api.completions.create(model="beta", prompt=PROMPTS[2], logprobs=2, max_tokens=6, temperature=0)
    lp = got.choices[0].logprobs
    want = direct(reference, PROMPTS[2], "beta", max_new_tokens=6)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    assert lp.tokens == [token_text(reference.tokenizer, t) for t in want.token_ids] and all(v is not None for v in lp.token_logprobs)
    assert len(set(lp.tokens)) > 1 and any(t.startswith("bytes:\\x") for t in lp.tokens)  # partial characters as OpenAI writes them


def _streamed_completion(api: Any, **request: Any) -> tuple[dict[int, dict[str, Any]], Any]:
    """A streamed completion put back together: per choice index its text, finish reason and logprob lists; the usage chunk."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in api.completions.create(stream=True, stream_options={"include_usage": True}, **request):
        usage = chunk.usage or usage
        for part in chunk.choices:
            got = choices.setdefault(part.index, {"text": "", "finish_reason": None, "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
            got["text"] += part.text
            got["finish_reason"] = part.finish_reason or got["finish_reason"]
            if part.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    got[key] += getattr(part.logprobs, key)
    return choices, usage


@pytest.mark.parametrize(
    "request_",
    [
        dict(model="alpha", prompt=PROMPTS[:2], n=2, max_tokens=8, temperature=0.8, seed=5),  # several prompts x n, seeded sampling
        dict(model="beta", prompt=PROMPTS[2], logprobs=2, max_tokens=6, temperature=0),  # generated logprobs (partial characters)
        dict(model="alpha", prompt=PROMPTS[0], echo=True, logprobs=3, max_tokens=4, temperature=0),  # echo: the prompt's scores first
        dict(model="fin", prompt=[PROMPTS[1], PROMPTS[2]], echo=True, max_tokens=0),  # the prompts alone, no engine
    ],
    ids=["prompts-x-n", "logprobs", "echo-logprobs", "echo-only"],
)
def test_a_stream_of_every_shape_adds_up_to_the_whole_answer(api, request_):
    """n, several prompts, echo and logprobs stream too: each choice's chunks concatenate to the unstreamed choice."""
    whole = api.completions.create(**request_)
    streamed, usage = _streamed_completion(api, **request_)
    assert sorted(streamed) == [c.index for c in whole.choices]
    for choice in whole.choices:
        got = streamed[choice.index]
        assert got["text"] == choice.text and got["finish_reason"] == choice.finish_reason
        if choice.logprobs is None:
            assert got["tokens"] == []
            continue
        assert got["tokens"] == choice.logprobs.tokens and got["text_offset"] == choice.logprobs.text_offset
        assert got["token_logprobs"] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
        assert [sorted(t) if t else t for t in got["top_logprobs"]] == [sorted(t) if t else t for t in choice.logprobs.top_logprobs]
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_a_chat_stream_with_n_and_logprobs_adds_up_to_the_whole_answer(api):
    request = dict(model="bio", messages=[{"role": "user", "content": "Hi"}], n=2, logprobs=True, top_logprobs=2, max_tokens=6, temperature=0.7, seed=3)
    whole = api.chat.completions.create(**request)
    text: dict[int, str] = {}
    tokens: dict[int, list[Any]] = {}
    roles = set()
    for chunk in api.chat.completions.create(stream=True, **request):
        for part in chunk.choices:
            if part.delta.role:
                roles.add(part.index)
            text[part.index] = text.get(part.index, "") + (part.delta.content or "")
            tokens.setdefault(part.index, []).extend(part.logprobs.content if part.logprobs else [])
    assert roles == {0, 1}
    for choice in whole.choices:
        assert text[choice.index] == choice.message.content
        assert [(t.token, t.bytes, [a.token for a in t.top_logprobs]) for t in tokens[choice.index]] == [
            (t.token, t.bytes, [a.token for a in t.top_logprobs]) for t in choice.logprobs.content
        ]
        assert [t.logprob for t in tokens[choice.index]] == pytest.approx([t.logprob for t in choice.logprobs.content], abs=1e-5)


def test_best_of_returns_the_candidates_of_highest_total_logprob(api):
    """best_of=3 decodes the three choices n=3 would (the same derived seeds) and returns the likeliest; usage counts all three."""
    request = dict(model="alpha", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7)
    candidates = api.completions.create(n=3, logprobs=0, **request)
    totals = [sum(c.logprobs.token_logprobs) for c in candidates.choices]
    best = api.completions.create(best_of=3, n=1, **request)
    assert [c.text for c in best.choices] == [candidates.choices[totals.index(max(totals))].text]
    assert best.choices[0].logprobs is None  # ranked by logprobs, returned only when asked for
    assert best.usage.completion_tokens == candidates.usage.completion_tokens
    two = api.completions.create(best_of=3, n=2, logprobs=1, **request)
    order = sorted(range(3), key=lambda i: -totals[i])[:2]
    assert [c.text for c in two.choices] == [candidates.choices[i].text for i in order] and [c.index for c in two.choices] == [0, 1]


def test_penalties_and_logit_bias_decode_as_the_engine(api, reference):
    for settings in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"logit_bias": {"7": 100}}):
        got = api.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=10, temperature=0, extra_body={"ignore_eos": True}, **settings)
        engine_settings = {**settings, "logit_bias": tuple((int(k), float(v)) for k, v in settings.get("logit_bias", {}).items())}
        want = direct(reference, PROMPTS[0], "alpha", max_new_tokens=10, ignore_eos=True, **engine_settings)
        assert got.choices[0].text == want.text, settings
    biased = api.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=4, temperature=0, logit_bias={"7": 100}, logprobs=0)
    assert biased.choices[0].logprobs.tokens == [reference.tokenizer.decode([7])] * 4


def test_seed_per_request_and_a_derived_seed_per_choice(api):
    def sample(n: int) -> list[str]:
        response = api.completions.create(model="base", prompt=PROMPTS[1], max_tokens=10, temperature=2.0, seed=5, n=n, extra_body={"ignore_eos": True})
        return [c.text for c in response.choices]

    four = sample(4)
    assert sample(4) == four and sample(1) == four[:1]  # reproducible; choice 0 uses the seed itself
    assert len(set(four)) > 1  # the other choices use seeds of their own


# -- /v1/chat/completions ----------------------------------------------------------


def test_chat_logprobs_content_parts_and_extra_message_keys(api, reference):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "name": "ana", "content": "What is DNA?"},
    ]
    got = api.chat.completions.create(model="bio", messages=messages, max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=2, n=2)
    prompt = chat_text(reference, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is DNA?"}])
    want = direct(reference, prompt, "alpha", max_new_tokens=6)
    assert [c.index for c in got.choices] == [0, 1] and all(c.message.content == want.text for c in got.choices)
    content = got.choices[0].logprobs.content
    assert len(content) == len(want.token_ids) and got.usage.completion_tokens == 2 * len(want.token_ids)
    for entry, token in zip(content, want.token_ids):
        assert entry.token == token_text(reference.tokenizer, token)
        assert bytes(entry.bytes) == (token_bytes(reference.tokenizer, token) if entry.token.startswith("bytes:") else entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert got.usage.prompt_tokens == len(reference.encode(prompt))


def test_chat_turns_as_lm_eval_sends_them(http, reference):
    body = {
        "model": "base", "max_tokens": 5, "temperature": 0, "seed": 1234, "stop": ["\n"],
        "messages": [{"type": "message", "role": "user", "content": "Question: Is"}, {"role": "developer", "content": [{"type": "text", "text": "x"}]}],
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    prompt = chat_text(reference, [{"role": "user", "content": "Question: Is"}, {"role": "system", "content": "x"}])
    assert response.json()["choices"][0]["message"]["content"] == direct(reference, prompt, None, max_new_tokens=5, stop=("\n",)).text


# -- structured output ---------------------------------------------------------------


def test_structured_output_holds_through_the_official_client(api, reference):
    """JSON schema and json_object (OpenAI's response_format) and a choice (vLLM's extension), streamed or not."""
    import json

    import jsonschema

    schema = {
        "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["answer", "score"], "additionalProperties": False,
    }
    chat = [{"role": "user", "content": "Is metformin used for type 2 diabetes?"}]
    answer = api.chat.completions.create(
        model="bio", messages=chat, max_tokens=40, temperature=1.0, seed=3, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}},
    )
    for choice in answer.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason == "stop"
    streamed = api.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True, extra_body={"structured_outputs": {"choice": ["benign", "malignant"]}})
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    whole = api.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body={"structured_outputs": {"choice": ["benign", "malignant"]}})
    assert text == whole.choices[0].text and text in ("benign", "malignant")
    anything = api.completions.create(model="fin", prompt=PROMPTS[1], max_tokens=60, temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert anything.choices[0].text.startswith("{")


def test_tool_calls_through_the_official_client(api):
    """A required call (named or any) comes back as tool_calls, whole or streamed; the conversation goes on with its result."""
    import json

    # short names: the tiny model's tokens are a character or two, and the server's cap is 64 tokens
    weather = {"type": "function", "function": {
        "name": "w",
        "parameters": {"type": "object", "properties": {"c": {"enum": ["Oslo", "Lima"]}}, "required": ["c"], "additionalProperties": False},
    }}
    now = {"type": "function", "function": {"name": "t", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}
    chat = [{"role": "user", "content": "Oslo?"}]
    named = api.chat.completions.create(
        model="bio", messages=chat, tools=[weather, now], tool_choice={"type": "function", "function": {"name": "w"}},
        max_tokens=64, temperature=0, parallel_tool_calls=False,
    )
    (choice,) = named.choices
    assert choice.message.tool_calls, choice.message.content
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.function.name == "w" and json.loads(call.function.arguments)["c"] in ("Oslo", "Lima")
    streamed = api.chat.completions.create(
        model="bio", messages=chat, tools=[weather, now], tool_choice={"type": "function", "function": {"name": "w"}},
        max_tokens=64, temperature=0, parallel_tool_calls=False, stream=True,
    )
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    calls = [t for d in deltas for t in d.tool_calls or ()]
    assert [(t.function.name, t.function.arguments) for t in calls] == [(call.function.name, call.function.arguments)]
    follow_up = [*chat, choice.message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "4 C and rain"}]  # the reply as history, whole
    answer = api.chat.completions.create(model="bio", messages=follow_up, tools=[weather, now], tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")
    anyone = api.chat.completions.create(model="fin", messages=chat, tools=[weather, now], tool_choice="required", max_tokens=64, temperature=0.8, seed=2)
    assert {c.function.name for c in anyone.choices[0].message.tool_calls} <= {"w", "t"}


# -- errors ------------------------------------------------------------------------


def test_what_carve_cannot_honour_is_4xx_naming_it(api, reference):
    import openai

    def refused(call: Any, status: int, param: str) -> None:
        with pytest.raises(openai.APIStatusError) as info:
            call()
        assert info.value.status_code == status and info.value.param == param, info.value.body

    chat = [{"role": "user", "content": "Hi"}]
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    refused(lambda: api.chat.completions.create(model="base", messages=chat, response_format=broken), 400, "response_format.json_schema.schema")
    refused(lambda: api.completions.create(model="base", prompt="x", extra_body={"structured_outputs": {"regex": "([a-z"}}), 400, "structured_outputs.regex")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    refused(lambda: api.chat.completions.create(model="base", messages=chat, tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice")
    refused(lambda: api.completions.create(model="base", prompt="x", best_of=1, n=2), 400, "best_of")
    refused(lambda: api.completions.create(model="base", prompt="x", suffix="y"), 422, "suffix")
    refused(lambda: api.completions.create(model="base", prompt=[[1, 2], [len(reference.tokenizer)]]), 400, "prompt.1")
    refused(lambda: api.completions.create(model="base", prompt="x", logit_bias={"99999": 1}), 400, "logit_bias")
    refused(lambda: api.completions.create(model="base", prompt="x", max_tokens=0), 400, "max_tokens")
    refused(lambda: api.completions.create(model="base", prompt="x", logprobs=21), 422, "logprobs")
    refused(lambda: api.chat.completions.create(model="base", messages=chat, top_logprobs=2), 400, "top_logprobs")
    refused(lambda: api.chat.completions.create(model="base", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]),
            422, "messages.0.content")


# -- tokenizer endpoints -------------------------------------------------------------


def test_tokenize_detokenize_and_tokenizer_info(http, api, reference):
    tokenizer = reference.tokenizer
    got = http.post("/tokenize", json={"prompt": PROMPTS[0], "return_token_strs": True}).json()
    assert got["tokens"] == reference.encode(PROMPTS[0]) and got["count"] == len(got["tokens"]) and got["max_model_len"] == 512
    assert got["token_strs"] == tokenizer.convert_ids_to_tokens(got["tokens"])
    plain = http.post("/tokenize", json={"prompt": PROMPTS[0], "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"] and plain["token_strs"] is None
    messages = [{"role": "user", "content": "What is DNA?"}]
    counted = http.post("/tokenize", json={"model": "base", "messages": messages}).json()["count"]
    assert counted == api.chat.completions.create(model="base", messages=messages, max_tokens=1).usage.prompt_tokens
    assert http.post("/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": tokenizer.decode(got["tokens"])}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template and info["model_max_length"] == 512
    bad = http.post("/detokenize", json={"tokens": [len(tokenizer)]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    bad = http.post("/tokenize", json={"prompt": 3})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "prompt"

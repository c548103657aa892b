"""Serving pieces that need no Ray: request parsing and limits, archives, replica ranking."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from carve.artifact import AdapterRef
from carve.engine.text import context_length, count_prompt_tokens
from carve.platform.affinity import ReplicaView, rank_for_adapter
from carve.platform.api import ChatCompletionRequest, CompletionRequest
from carve.platform.archive import ArchiveError, extract_adapter_archive
from carve.platform.config import ServeConfig
from carve.platform.requests import ApiError, parse_body, plan_request


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def parse_error(raw: bytes | str, model: type = CompletionRequest) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_body(raw.encode() if isinstance(raw, str) else raw, model)
    return info.value


def test_malformed_json_is_422_with_position():
    err = parse_error('{"model": "base", "prompt": ')
    assert err.status == 422 and "malformed JSON" in err.message and "line 1" in err.message


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "base", "prompt": "hi", "n": 0}, "n"),
        ({"model": "base", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"model": "base", "prompt": "hi", "temperature": -1}, "temperature"),
        ({"model": "base", "prompt": "hi", "max_token": 5}, "max_token"),
        ({"model": "base"}, "prompt"),
        ({"model": "base", "prompt": ["a", [1]]}, "prompt"),
        ({"model": "base", "prompt": [[1], []]}, "prompt"),
        ({"model": "base", "prompt": [3, -1]}, "prompt"),
        ({"model": "base", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "base", "prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"model": "base", "prompt": "hi", "logit_bias": {"the": 1}}, "logit_bias"),
        ({"model": "base", "prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"model": "base", "prompt": "hi", "frequency_penalty": 2.5}, "frequency_penalty"),
        ({"model": "base", "prompt": "hi", "seed": 2**64}, "seed"),
        ({"model": "base", "prompt": "hi", "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": "base", "prompt": "hi", "response_format": {"type": "json_schema"}}, "response_format"),
        ({"model": "base", "prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"model": "base", "prompt": "hi", "structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"model": "base", "prompt": "hi", "tools": [{"type": "function"}]}, "tools"),
        ({"model": "base", "prompt": "hi", "suffix": "x"}, "suffix"),
    ],
)
def test_bad_field_is_422_naming_it(body, field):
    err = parse_error(json.dumps(body))
    assert err.status == 422 and err.param == field and f"{field}:" in err.message


def test_bad_chat_message_names_its_position():
    err = parse_error(json.dumps({"model": "base", "messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}), ChatCompletionRequest)
    assert err.param == "messages.1.role"
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    assert parse_error(json.dumps({"model": "base", "messages": [{"role": "user", "content": image}]}), ChatCompletionRequest).param.startswith("messages.0.content")
    for message in [{"role": "tool", "content": "42"}, {"role": "user"}, {"role": "user", "content": "x", "tool_calls": []}]:
        err = parse_error(json.dumps({"model": "base", "messages": [message]}), ChatCompletionRequest)
        assert err.status == 422 and err.param == "messages.0", err.message
    for arguments in ["not json", "[1, 2]"]:
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
        err = parse_error(json.dumps({"model": "base", "messages": [{"role": "assistant", "tool_calls": [call]}]}), ChatCompletionRequest)
        assert err.status == 422 and err.param == "messages.0.tool_calls.0.function.arguments", err.message
    err = parse_error(json.dumps({"model": "base", "messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]}), ChatCompletionRequest)
    assert err.status == 422 and err.param == "messages.0.audio"


def test_prompt_shapes():
    for prompt, want in [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])]:
        assert CompletionRequest(model="base", prompt=prompt).prompt_list() == want
    chat = ChatCompletionRequest.model_validate(
        {"model": "base", "messages": [{"role": "developer", "type": "message", "name": "ops", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}]}
    )
    assert chat.template_messages() == [{"role": "system", "content": "Be brief."}]


def test_body_must_be_an_object():
    assert parse_error("[1, 2]").status == 422


def config(**kw) -> ServeConfig:
    return ServeConfig(model="m", max_tokens_cap=64, default_max_tokens=16, **kw)


def plan_one(body, tokenizer, context: int = 512, target=None):
    """The only job of a one-prompt, one-choice request."""
    (planned,) = plan_request(body, target, tokenizer, context, config())
    (job,) = planned.jobs
    return job


def test_job_from_completion_keeps_prompt_and_sampling(tokenizer):
    body = CompletionRequest(
        model="alpha", prompt="The patient was", max_tokens=8, temperature=0.5, top_p=0.9, seed=3, stop="x",
        frequency_penalty=0.5, presence_penalty=-0.25, logit_bias={"7": -100},
    )
    target = AdapterRef("alpha", 2, "/nowhere")
    job = plan_one(body, tokenizer, target=target)
    ids = tuple(tokenizer("The patient was")["input_ids"])
    assert (job.prompt, job.adapter, job.max_new_tokens, job.temperature, job.top_p, job.seed, job.stop) == (ids, target, 8, 0.5, 0.9, 3, ("x",))
    sampling = job.sampling()
    assert (sampling.frequency_penalty, sampling.presence_penalty, sampling.logit_bias) == (0.5, -0.25, ((7, -100.0),))
    assert job.prompt_tokens == len(ids) and job.logprobs is None and job.prompt_logprobs is None
    default = plan_one(CompletionRequest(model="base", prompt="hi"), tokenizer)
    assert default.max_new_tokens == 16 and default.temperature == 1.0 and not default.ignore_eos and not default.sampling().adjusts_scores
    assert plan_one(CompletionRequest(model="base", prompt="hi", ignore_eos=True), tokenizer).sampling().ignore_eos


def test_token_id_prompts_are_used_exactly_and_choices_get_derived_seeds(tokenizer):
    body = CompletionRequest(model="base", prompt=[[5, 6, 7], [8]], n=3, seed=11, echo=True, logprobs=2, max_tokens=1)
    planned = plan_request(body, None, tokenizer, 512, config())
    assert [p.ids for p in planned] == [(5, 6, 7), (8,)] and planned[0].text == tokenizer.decode([5, 6, 7])
    seeds = [job.seed for job in planned[0].jobs]
    assert seeds[0] == 11 and len(set(seeds)) == 3 and seeds == [job.seed for job in planned[1].jobs]
    assert all((job.prompt_logprobs, job.logprobs) == (2, 2) for p in planned for job in p.jobs)
    with pytest.raises(ApiError) as info:
        plan_request(CompletionRequest(model="base", prompt=[1, len(tokenizer)]), None, tokenizer, 512, config())
    assert info.value.status == 400 and info.value.param == "prompt" and info.value.code == "invalid_token_id"
    with pytest.raises(ApiError) as info:
        plan_request(CompletionRequest(model="base", prompt="hi", logit_bias={str(len(tokenizer)): 1}), None, tokenizer, 512, config())
    assert info.value.param == "logit_bias"


@pytest.mark.parametrize(
    "body, param",
    [
        (CompletionRequest(model="base", prompt="hi", max_tokens=0), "max_tokens"),
        (ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "x"}], top_logprobs=2), "top_logprobs"),
        (CompletionRequest(model="base", prompt=["a"] * 9, n=30), "n"),
        (CompletionRequest(model="base", prompt="hi", n=3, best_of=2), "best_of"),
        (CompletionRequest(model="base", prompt="hi", best_of=2, stream=True), "best_of"),
        (CompletionRequest(model="base", prompt=["a"] * 9, best_of=30), "best_of"),
    ],
)
def test_combinations_carve_cannot_answer_are_400(tokenizer, body, param):
    with pytest.raises(ApiError) as info:
        plan_request(body, None, tokenizer, 512, config())
    assert info.value.status == 400 and info.value.param == param


def test_response_format_and_structured_outputs_become_the_jobs_grammar(tokenizer):
    from carve.engine.requests import Grammar

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = [{"role": "user", "content": "x"}]
    as_schema = ChatCompletionRequest.model_validate(
        {"model": "base", "messages": chat, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}}
    )
    assert plan_one(as_schema, tokenizer).grammar == Grammar("json_schema", json.dumps(schema))
    assert plan_one(CompletionRequest(model="base", prompt="hi", response_format={"type": "json_object"}), tokenizer).grammar.kind == "json_schema"
    assert plan_one(CompletionRequest(model="base", prompt="hi", response_format={"type": "text"}), tokenizer).grammar is None
    regex = plan_one(CompletionRequest.model_validate({"model": "base", "prompt": "hi", "structured_outputs": {"regex": "[0-9]+"}}), tokenizer)
    assert regex.sampling().grammar == Grammar("regex", "[0-9]+")
    choice = plan_one(CompletionRequest.model_validate({"model": "base", "prompt": "hi", "structured_outputs": {"choice": ['say "yes"', "né"]}}), tokenizer)
    assert choice.grammar.kind == "lark"
    both = CompletionRequest.model_validate({"model": "base", "prompt": "hi", "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}})
    for body, param in [
        (both, "structured_outputs"),
        (CompletionRequest.model_validate({"model": "base", "prompt": "hi", "structured_outputs": {"json": "{oops"}}), "structured_outputs.json"),
        (CompletionRequest.model_validate({"model": "base", "prompt": "hi", "structured_outputs": {"grammar": "start: missing"}}), "structured_outputs.grammar"),
    ]:
        with pytest.raises(ApiError) as info:
            plan_one(body, tokenizer)
        assert info.value.status == 400 and info.value.param == param, info.value.message


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now"}}


def test_tools_join_the_prompt_and_a_required_call_constrains_the_reply(tokenizer):
    conversation = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"},
    ]
    auto = plan_request(ChatCompletionRequest.model_validate({"model": "base", "messages": conversation, "tools": [WEATHER, NOW]}), None, tokenizer, 4096, config())
    text = auto[0].text
    assert text.index("Be brief.") < text.index("<tools>") < text.index('"get_weather"') < text.index('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    assert "<tool_response>\n4 C, rain\n</tool_response>" in text and auto[0].jobs[0].grammar is None
    named = {"model": "base", "messages": conversation[1:2], "tools": [WEATHER, NOW], "tool_choice": {"type": "function", "function": {"name": "now"}}}
    (planned,) = plan_request(ChatCompletionRequest.model_validate(named), None, tokenizer, 4096, config())
    assert planned.jobs[0].grammar.kind == "lark" and '"now"' in planned.jobs[0].grammar.source and "get_weather" not in planned.jobs[0].grammar.source
    assert '"name": "now"' in planned.text and "get_weather" not in planned.text  # only the named function is shown
    off = plan_request(ChatCompletionRequest.model_validate({"model": "base", "messages": conversation[1:2], "tools": [WEATHER], "tool_choice": "none"}), None, tokenizer, 4096, config())
    assert "<tools>" not in off[0].text
    parallel = [*conversation[1:3], {"role": "tool", "tool_call_id": "call_2", "content": "12 C"}, {"role": "tool", "tool_call_id": "call_3", "content": "sun"}]
    merged = ChatCompletionRequest.model_validate({"model": "base", "messages": parallel}).template_messages()
    assert [m["role"] for m in merged] == ["user", "assistant", "user"] and merged[2]["content"].count("<tool_response>") == 2
    for body, param in [
        ({"model": "base", "messages": conversation[1:2], "tool_choice": "auto"}, "tool_choice"),
        ({**named, "stop": ["}"]}, "stop"),
        ({**named, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
        ({**named, "response_format": {"type": "json_object"}}, "tool_choice"),
    ]:
        with pytest.raises(ApiError) as info:
            plan_request(ChatCompletionRequest.model_validate(body), None, tokenizer, 4096, config())
        assert info.value.status == 400 and info.value.param == param, info.value.message


def test_a_reply_s_calls_are_read_back_whole_or_streamed():
    from carve.engine.batching import Job, JobEvent, JobResult
    from carve.platform.responses import chat_choices
    from carve.platform.streaming import choice_streams

    body = ChatCompletionRequest.model_validate({"model": "base", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, NOW]})
    reply = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><tool_call>{"name": "now", "arguments": {}}</tool_call>'
    (choice,) = chat_choices(None, body, [JobResult(text=reply, finish_reason="stop")])
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [("get_weather", {"city": "Oslo"}), ("now", {})]
    single = body.model_copy(update={"parallel_tool_calls": False})
    assert [c.function.name for c in chat_choices(None, single, [JobResult(text=reply, finish_reason="stop")])[0].message.tool_calls] == ["get_weather"]
    (plain,) = chat_choices(None, body, [JobResult(text="It rains <tool_call>{broken", finish_reason="length")])
    assert (plain.message.content, plain.message.tool_calls, plain.finish_reason) == ("It rains <tool_call>{broken", None, "length")
    from carve.platform.requests import PlannedPrompt

    (stream,) = choice_streams(body, [PlannedPrompt("x", (1,), (Job(prompt=(1,), prompt_tokens=1, adapter=None, max_new_tokens=9),))])
    pieces = [reply[i : i + 7] for i in range(0, len(reply), 7)]
    chunks = [stream.take(JobEvent(delta=piece, tokens=1, finish_reason="stop" if i == len(pieces) - 1 else None), None) for i, piece in enumerate(pieces)]
    sent = [c for c in chunks if c is not None]
    assert "".join(c.delta.content or "" for c in sent) == choice.message.content == "Checking. "
    assert all(c.delta.tool_calls is None for c in sent[:-1]) and sent[-1].finish_reason == "tool_calls"
    assert [t.function.name for t in sent[-1].delta.tool_calls] == ["get_weather", "now"] and [t.index for t in sent[-1].delta.tool_calls] == [0, 1]


def test_best_of_decodes_every_candidate_with_logprobs_to_rank_them(tokenizer):
    from carve.engine.batching import JobResult
    from carve.engine.scoring import TokenLogprob
    from carve.platform.responses import best_candidates

    (planned,) = plan_request(CompletionRequest(model="base", prompt="hi", best_of=3, seed=4, temperature=1.0), None, tokenizer, 512, config())
    assert len(planned.jobs) == 3 and all(job.logprobs == 0 for job in planned.jobs) and len({job.seed for job in planned.jobs}) == 3
    results = [JobResult(text=str(total), logprobs=[TokenLogprob(1, lp, ()) for lp in (total / 2, total / 2)]) for total in (-3.0, -1.0, -2.0, -0.5, -4.0, -0.1)]
    assert [r.text for r in best_candidates(results, 3, 2)] == ["-1.0", "-2.0", "-0.1", "-0.5"]  # per prompt, best first
    assert best_candidates(results, 2, 2) == results


def test_chat_job_uses_the_chat_template(tokenizer):
    from carve.engine.text import format_user_prompt

    one = ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "What is DNA?"}])
    (planned,) = plan_request(one, None, tokenizer, 512, config())
    assert planned.text == format_user_prompt(tokenizer, "What is DNA?") and planned.jobs[0].prompt == tuple(tokenizer(planned.text)["input_ids"])
    two = ChatCompletionRequest(model="base", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    (planned,) = plan_request(two, None, tokenizer, 512, config())
    assert planned.text.index("Be brief.") < planned.text.index("Hi") and planned.text.endswith("assistant\n")


def test_max_tokens_over_cap_is_400(tokenizer):
    with pytest.raises(ApiError) as info:
        plan_one(CompletionRequest(model="base", prompt="hi", max_tokens=65), tokenizer)
    assert info.value.status == 400 and info.value.param == "max_tokens" and "64" in info.value.message
    with pytest.raises(ApiError) as info:
        plan_one(ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "x"}], max_completion_tokens=100), tokenizer)
    assert info.value.param == "max_completion_tokens"


def test_prompt_over_context_is_400(tokenizer):
    long = "The patient was treated with aspirin. " * 40
    n = count_prompt_tokens(tokenizer, long)
    with pytest.raises(ApiError) as info:
        plan_one(CompletionRequest(model="base", prompt=long, max_tokens=8), tokenizer, context=n + 7)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded" and f"{n} in the prompt" in info.value.message
    assert plan_one(CompletionRequest(model="base", prompt=long, max_tokens=8), tokenizer, context=n + 8).prompt_tokens == n
    with pytest.raises(ApiError) as info:
        plan_request(CompletionRequest(model="base", prompt=["hi", long], max_tokens=8), None, tokenizer, n + 7, config())
    assert info.value.param == "prompt.1"


def test_context_length_reads_the_model_config(tiny_model_dir):
    assert context_length(tiny_model_dir) == 512


def test_config_rejects_default_over_cap():
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServeConfig(default_max_tokens=100, max_tokens_cap=50)


# -- archives ----------------------------------------------------------------


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def file_info(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def test_tar_archive_of_an_adapter_folder(tmp_path, tiny_adapters):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(tiny_adapters["alpha"], arcname="alpha")
    folder = extract_adapter_archive(buffer.getvalue(), tmp_path, 10**8)
    assert folder == tmp_path / "alpha" and (folder / "adapter_config.json").is_file()


def test_zip_archive_with_files_at_the_root(tmp_path, tiny_adapters):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in tiny_adapters["beta"].iterdir():
            archive.write(file, file.name)
    folder = extract_adapter_archive(buffer.getvalue(), tmp_path, 10**8)
    assert folder == tmp_path and (folder / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name, why", [("../evil.json", "'..'"), ("/etc/evil", "absolute"), ("a/../../b", "'..'")])
def test_unsafe_tar_paths_are_refused(tmp_path, name, why):
    with pytest.raises(ArchiveError, match=why):
        extract_adapter_archive(tar_bytes([(file_info(name), b"x")]), tmp_path / "out", 10**6)
    assert not (tmp_path / "evil.json").exists() and not list(tmp_path.rglob("evil*"))


def test_tar_links_are_refused(tmp_path):
    link = tarfile.TarInfo("adapter_config.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ArchiveError, match="link"):
        extract_adapter_archive(tar_bytes([(link, b"")]), tmp_path, 10**6)
    assert not (tmp_path / "adapter_config.json").exists()


def test_unsafe_zip_paths_are_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../evil.txt", "x")
    with pytest.raises(ArchiveError, match="'..'"):
        extract_adapter_archive(buffer.getvalue(), tmp_path / "out", 10**6)
    assert not (tmp_path / "evil.txt").exists()


def test_not_an_archive_and_too_big(tmp_path):
    with pytest.raises(ArchiveError, match="neither"):
        extract_adapter_archive(b"hello", tmp_path, 10**6)
    with pytest.raises(ArchiveError, match="more than 10 bytes"):
        extract_adapter_archive(tar_bytes([(file_info("a"), b"x" * 11)]), tmp_path, 10)


# -- replica ranking -----------------------------------------------------------


def test_rank_prefers_holders_then_free_slots():
    replicas = [ReplicaView("r1", frozenset({"a@v1", "b@v1"}), 2), ReplicaView("r2", frozenset({"c@v1"}), 2), ReplicaView("r3", frozenset(), 2)]
    assert rank_for_adapter("a@v1", replicas, {}) == [["r1"], ["r2", "r3"]]
    assert rank_for_adapter("d@v1", replicas, {}) == [["r2", "r3"], ["r1"]]
    assert rank_for_adapter("d@v1", replicas, {"d@v1": "r3"}) == [["r3"], ["r2"], ["r1"]]
    assert rank_for_adapter(None, replicas, {}) == [["r1", "r2", "r3"]]


def test_a_prompt_far_over_the_context_is_refused_before_it_is_tokenized(tokenizer):
    from carve.engine.text import longest_token_chars

    longest = longest_token_chars(tokenizer)
    assert longest >= max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))  # an upper bound on what one token decodes to

    class Counting:  # the real tokenizer, counting how often it tokenizes
        calls = 0

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __len__(self):
            return len(tokenizer)

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return tokenizer(*args, **kwargs)

    counting = Counting()
    huge = "x" * (512 * longest + 1)
    for body, param in ((CompletionRequest(model="base", prompt=["hi", huge]), "prompt.1"),
                        (ChatCompletionRequest(model="base", messages=[{"role": "user", "content": huge}]), "messages")):
        with pytest.raises(ApiError) as info:
            plan_request(body, None, counting, 512, config(), token_chars=longest)
        assert (info.value.status, info.value.code, info.value.param) == (400, "context_length_exceeded", param)
        assert "more than this model's context of 512 tokens" in info.value.message
    assert Counting.calls == 1  # only "hi"; the huge prompts never reached the tokenizer


def test_the_gateway_admits_up_to_its_capacity_and_refuses_the_rest_at_once_with_retry_after():
    from carve.platform.engine_client import Admission
    from carve.platform.requests import ApiError

    admission = Admission(2)
    first, second = admission.enter(), admission.enter()
    with pytest.raises(ApiError) as refused:
        admission.enter()
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"} and "at capacity" in str(refused.value)
    first()
    first()  # a release counts once
    assert admission.held == 1
    third = admission.enter()
    second(), third()
    assert admission.held == 0

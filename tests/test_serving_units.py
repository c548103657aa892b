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
from carve.platform.requests import ApiError, build_job, parse_body


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
        ({"model": "base", "prompt": "hi", "n": 2}, "n"),
        ({"model": "base", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "base", "prompt": "hi", "temperature": -1}, "temperature"),
        ({"model": "base", "prompt": "hi", "max_token": 5}, "max_token"),
        ({"model": "base"}, "prompt"),
        ({"model": "base", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "base", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_bad_field_is_422_naming_it(body, field):
    err = parse_error(json.dumps(body))
    assert err.status == 422 and err.param == field and f"{field}:" in err.message


def test_bad_chat_message_names_its_position():
    err = parse_error(json.dumps({"model": "base", "messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}), ChatCompletionRequest)
    assert err.param == "messages.1.role"


def test_body_must_be_an_object():
    assert parse_error("[1, 2]").status == 422


def config(**kw) -> ServeConfig:
    return ServeConfig(model="m", max_tokens_cap=64, default_max_tokens=16, **kw)


def test_job_from_completion_keeps_prompt_and_sampling(tokenizer):
    body = CompletionRequest(model="alpha", prompt="The patient was", max_tokens=8, temperature=0.5, top_p=0.9, seed=3, stop="x")
    target = AdapterRef("alpha", 2, "/nowhere")
    job = build_job(body, target, tokenizer, 512, config())
    assert (job.prompt, job.adapter, job.max_new_tokens, job.temperature, job.top_p, job.seed, job.stop) == (
        "The patient was", target, 8, 0.5, 0.9, 3, ("x",))
    assert job.prompt_tokens == len(tokenizer("The patient was")["input_ids"])
    default = build_job(CompletionRequest(model="base", prompt="hi"), None, tokenizer, 512, config())
    assert default.max_new_tokens == 16 and default.temperature == 1.0 and not default.ignore_eos
    assert build_job(CompletionRequest(model="base", prompt="hi", ignore_eos=True), None, tokenizer, 512, config()).sampling().ignore_eos


def test_chat_job_uses_the_chat_template(tokenizer):
    from carve.engine.text import format_user_prompt

    one = ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "What is DNA?"}])
    assert build_job(one, None, tokenizer, 512, config()).prompt == format_user_prompt(tokenizer, "What is DNA?")
    two = ChatCompletionRequest(model="base", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    prompt = build_job(two, None, tokenizer, 512, config()).prompt
    assert prompt.index("Be brief.") < prompt.index("Hi") and prompt.endswith("assistant\n")


def test_max_tokens_over_cap_is_400(tokenizer):
    with pytest.raises(ApiError) as info:
        build_job(CompletionRequest(model="base", prompt="hi", max_tokens=65), None, tokenizer, 512, config())
    assert info.value.status == 400 and info.value.param == "max_tokens" and "64" in info.value.message
    with pytest.raises(ApiError) as info:
        build_job(ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "x"}], max_completion_tokens=100), None, tokenizer, 512, config())
    assert info.value.param == "max_completion_tokens"


def test_prompt_over_context_is_400(tokenizer):
    long = "The patient was treated with aspirin. " * 40
    n = count_prompt_tokens(tokenizer, long)
    with pytest.raises(ApiError) as info:
        build_job(CompletionRequest(model="base", prompt=long, max_tokens=8), None, tokenizer, n + 7, config())
    assert info.value.status == 400 and info.value.code == "context_length_exceeded" and f"{n} in the prompt" in info.value.message
    assert build_job(CompletionRequest(model="base", prompt=long, max_tokens=8), None, tokenizer, n + 8, config()).prompt_tokens == n


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

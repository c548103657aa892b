"""Base model resolution, the device/precision policy, GGUF conversion and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carve.cli.app import app
from carve.engine.models import (
    COMPLETE_MARKER,
    PACKAGED_MODELS,
    ModelError,
    convert_gguf,
    fingerprint_weights,
    plan_load,
    resolve_model,
)

runner = CliRunner()


@pytest.mark.parametrize(
    ("cuda", "precision", "quantize", "expected"),
    [
        (True, "auto", None, ("cuda", "bf16", True, "bf16", "native")),
        (True, "fp32", False, ("cuda", "fp32", False, "fp32", "native")),
        (True, "bf16", False, ("cuda", "bf16", False, "bf16", "native")),
        (False, "auto", None, ("cpu", "fp32", False, "fp32", "native")),
        (False, "fp32", None, ("cpu", "fp32", False, "fp32", "native")),
        (False, "bf16", None, ("cpu", "fp32", False, "fp32", "bf16")),  # an fp32 model, its decoding products on bf16 copies
        (False, "int8", None, ("cpu", "fp32", False, "fp32", "int8")),
        (False, "auto", True, ("cpu", "fp32", True, "fp32", "native")),
    ],
)
def test_device_and_precision_policy(cuda: bool, precision: str, quantize: bool | None, expected: tuple) -> None:
    plan = plan_load(cuda, precision, quantize)  # type: ignore[arg-type]
    assert (plan.device, plan.dtype, plan.quantize_4bit, plan.compute_dtype, plan.engine_weights) == expected


@pytest.mark.parametrize(("cuda", "precision", "quantize"), [(True, "int8", None), (False, "bf16", True), (False, "int8", True), (False, "fp16", None)])
def test_precisions_that_cannot_hold_are_refused(cuda: bool, precision: str, quantize: bool | None) -> None:
    with pytest.raises(ModelError, match="precision"):
        plan_load(cuda, precision, quantize)  # type: ignore[arg-type]


def test_unknown_model_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model("llama-9000", tmp_path)
    for name in PACKAGED_MODELS:
        assert name in str(info.value)
    assert not any(tmp_path.iterdir())


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(empty))
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weight files"):
        resolve_model(str(empty))
    afile = tmp_path / "weights.txt"
    afile.write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(afile))


def test_local_folder_resolves_with_fingerprint(tiny_model_dir: Path) -> None:
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.path == tiny_model_dir.resolve()
    assert resolved.fingerprint == fingerprint_weights(tiny_model_dir)
    assert resolved.fingerprint.startswith("sha256:")


def test_cli_generate_with_adapter_and_errors(tiny_model_dir: Path, tiny_adapters: dict[str, Path], other_model_dir: Path) -> None:
    ok = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapters["alpha"]), "--max-new-tokens", "5", "The patient"])
    assert ok.exit_code == 0, ok.output
    bad_model = runner.invoke(app, ["generate", "--model", "no-such-model", "hi"])
    assert bad_model.exit_code == 2 and "smollm2-135m-instruct" in bad_model.output
    misfit = runner.invoke(app, ["generate", "--model", str(other_model_dir), "--adapter", str(tiny_adapters["alpha"]), "hi"])
    assert misfit.exit_code == 2 and "does not fit" in misfit.output


def test_cli_models_lists_packaged_models(tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "--cache", str(tmp_path)])
    assert result.exit_code == 0
    assert "smollm2" in result.output and "gemma3-270m" in result.output


@pytest.mark.integration
def test_interrupted_conversion_leaves_nothing_then_retry_loads_and_answers(tmp_path: Path) -> None:
    """A conversion killed at its last moment leaves no loadable folder; the retry works
    and the real SmolLM2 answers a question."""
    smollm2 = PACKAGED_MODELS["smollm2-135m-instruct"]
    target = tmp_path / smollm2.name

    def killed(_staging: Path) -> None:
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        convert_gguf(smollm2, target, before_rename=killed)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too

    # a half-written folder (no completion marker) left by some older crash is not trusted
    target.mkdir()
    (target / "config.json").write_text("{}")
    resolved = resolve_model(smollm2.name, tmp_path)
    assert (target / COMPLETE_MARKER).is_file() and resolved.model_id == smollm2.hf_id

    from carve.engine.decoding import Engine, GenerationRequest, Sampling
    from carve.engine.models import load_base
    from carve.engine.text import format_user_prompt

    model, tokenizer = load_base(resolved, plan_load(False))
    engine = Engine(model, tokenizer)
    prompt = format_user_prompt(tokenizer, "What is the capital of France? Answer in one word.")
    answer = engine.generate([GenerationRequest.single(prompt, None, Sampling(max_new_tokens=12))])[0]
    assert "paris" in answer.text.lower(), answer.text
    assert answer.finish_reason == "eos"
    shutil.rmtree(target)

"""Structured output in the engine: a grammar (JSON schema, regex, choice) holds every request that asks for one,
whatever its model writes (here a random one), and changes nothing for the requests beside it."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from carve.engine.constraints import choice_grammar, compiled, json_object_grammar
from carve.engine.decoding import Engine, EngineError, GenerationRequest, Sampling
from carve.engine.models import load_base, plan_load, resolve_model
from carve.engine.requests import Branch, Grammar

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
PROMPT = "Question: Is metformin used for type 2 diabetes? Answer in JSON:"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapters) -> Engine:
    model, tokenizer = load_base(resolve_model(str(tiny_model_dir)), plan_load(False))
    eng = Engine(model, tokenizer, base_label="tiny")
    for name, adapter in tiny_adapters.items():
        eng.load_adapter(name, adapter)
    return eng


def constrained(grammar: Grammar, adapter: str | None = "alpha", **sampling) -> GenerationRequest:
    return GenerationRequest.single(PROMPT, adapter, Sampling(**{"max_new_tokens": 64, **sampling}, grammar=grammar))


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, seed=3), dict(temperature=1.5, top_p=0.9, seed=8)], ids=["greedy", "t1", "t1.5-top-p"])
def test_a_json_schema_holds_whatever_the_model_writes(engine: Engine, sampling: dict) -> None:
    done = engine.generate([constrained(Grammar("json_schema", json.dumps(SCHEMA)), **sampling)])[0]
    jsonschema.validate(json.loads(done.text), SCHEMA)
    assert done.finish_reason in ("stop", "eos")


def test_json_object_regex_and_choice_on_every_rule(engine: Engine) -> None:
    """Each grammar kind holds on one adapter, on a mixture and under contrast, in one batch."""
    number = Grammar("regex", r"-?[0-9]{1,4}\.[0-9]{2}")
    choice = choice_grammar(["positive", "say \"no\"", "neutré"])
    mixture = GenerationRequest((Branch(PROMPT, "alpha", 0.6), Branch(PROMPT, "beta", 0.4)), "mixture", Sampling(max_new_tokens=64, grammar=number))
    contrast = GenerationRequest((Branch(PROMPT, "beta"), Branch(PROMPT, None, 0.5)), "contrast", Sampling(max_new_tokens=64, grammar=choice))
    whole, mixed, contrasted = engine.generate([constrained(json_object_grammar(), temperature=1.0, seed=1, max_new_tokens=200), mixture, contrast])
    if whole.finish_reason != "length":  # a random model may write a long object; cut by length it is a valid prefix only
        assert isinstance(json.loads(whole.text), dict)
    assert whole.text.startswith("{")
    assert re.fullmatch(r"-?[0-9]{1,4}\.[0-9]{2}", mixed.text) and mixed.finish_reason == "stop"
    assert contrasted.text in ("positive", "say \"no\"", "neutré") and contrasted.finish_reason == "stop"


def test_constrained_requests_leave_their_batch_company_unchanged(engine: Engine) -> None:
    free = [GenerationRequest.single(PROMPT, "beta", Sampling(max_new_tokens=12)), GenerationRequest.single(PROMPT, None, Sampling(max_new_tokens=9, temperature=0.9, seed=5))]
    alone = engine.generate(free)
    together = engine.generate([free[0], constrained(Grammar("json_schema", json.dumps(SCHEMA))), free[1]])
    assert [c.token_ids for c in alone] == [together[0].token_ids, together[2].token_ids]


def test_the_same_seed_gives_the_same_structured_answer(engine: Engine) -> None:
    request = constrained(Grammar("json_schema", json.dumps(SCHEMA)), temperature=1.0, seed=42)
    assert engine.generate([request])[0].token_ids == engine.generate([request])[0].token_ids


@pytest.mark.parametrize(
    "grammar,named",
    [(Grammar("json_schema", "{not json"), "json_schema"), (Grammar("json_schema", '{"type": "nonsense"}'), "nonsense"),
     (Grammar("regex", "([a-z"), "regex"), (Grammar("lark", "start: undefined_rule"), "lark")],
)
def test_a_grammar_that_does_not_compile_is_refused_naming_why(engine: Engine, grammar: Grammar, named: str) -> None:
    with pytest.raises(EngineError, match=named):
        compiled(grammar)
    session = engine.session()
    with pytest.raises(EngineError):
        session.admit([GenerationRequest.single(PROMPT, None, Sampling(max_new_tokens=4)), constrained(grammar)])
    assert session.idle and not session.requests  # nothing admitted


def test_a_required_tool_call_is_a_well_formed_call_of_a_listed_function(engine: Engine) -> None:
    from carve.engine.tool_calls import Function, calls_grammar, parse_calls

    weather = Function("get_weather", "", {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"], "additionalProperties": False})
    now = Function("now", "", {"type": "object", "properties": {}, "additionalProperties": False})
    for seed in range(3):
        done = engine.generate([constrained(calls_grammar([weather, now], parallel=False), temperature=1.0, seed=seed, max_new_tokens=80)])[0]
        content, calls = parse_calls(done.text)
        assert content == "" and len(calls) == 1 and done.finish_reason in ("stop", "eos"), done.text
        schema = weather.parameters if calls[0].name == "get_weather" else now.parameters
        jsonschema.validate(json.loads(calls[0].arguments), schema)


def test_contrast_without_a_plausibility_cut_stays_inside_the_grammar(engine: Engine) -> None:
    """alpha 0 keeps every token plausible: forbidden tokens must still never be picked (no NaN scores)."""
    choice = choice_grammar(["yes", "no"])
    for sampling in (Sampling(max_new_tokens=8, alpha=0.0, grammar=choice), Sampling(max_new_tokens=8, alpha=0.0, temperature=1.0, seed=4, grammar=choice)):
        done = engine.generate([GenerationRequest((Branch(PROMPT, "beta"), Branch(PROMPT, None, 0.5)), "contrast", sampling)])[0]
        assert done.text in ("yes", "no")

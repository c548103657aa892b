"""The Carve server on a real local Ray: one Serve instance for the module, real SQLite registry, real HTTP.

Run under the offline wrapper:
    ../shared/tools/offline .venv/bin/python -m pytest -q tests/test_serving.py
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from live_server import carve_home, local_server

pytestmark = pytest.mark.ray

ADMIN = "test-admin-token-0123"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with carve_home(tmp_path_factory.mktemp("carve-home")) as root:
        yield root


@pytest.fixture(scope="module")
def registry(home: Path, tiny_model_dir: Path, tiny_adapters: dict[str, Path]):
    from carve.adapters.registry import Registry

    reg = Registry(home / "registry")
    reg.add(tiny_adapters["alpha"], "alpha", tags=["bio"], base=str(tiny_model_dir))
    reg.add(tiny_adapters["beta"], "beta", tags=["fin"], base=str(tiny_model_dir))
    return reg


@pytest.fixture(scope="module")
def server(registry, tiny_model_dir: Path) -> Iterator[str]:
    with local_server(
        tiny_model_dir, registry.root, max_adapters=2, num_cpus=2, engine_num_cpus=0, admin_token=ADMIN,
        max_tokens_cap=64, default_max_tokens=16, batch_wait_s=0.05,
        draft_tokens=4, draft_max_rows=64,  # speculative decoding on: every served token must still be the engine's own greedy one
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def direct(reference, prompt: str, adapter: str | None, max_tokens: int = MAX_TOKENS) -> str:
    from carve.engine.decoding import GenerationRequest, Sampling

    return reference.generate([GenerationRequest.single(prompt, adapter, Sampling(max_tokens))])[0].text


def direct_mix(reference, prompt: str, mix: dict[str, float], max_tokens: int = MAX_TOKENS) -> str:
    """The engine's own output-space mixture (rule ``mixture``, one branch per adapter)."""
    from carve.engine.decoding import Branch, GenerationRequest, Sampling

    branches = tuple(Branch(prompt, adapter, weight) for adapter, weight in mix.items())
    return reference.generate([GenerationRequest(branches, "mixture", Sampling(max_tokens))])[0].text


def complete(client: httpx.Client, model: str, prompt: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def admin(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


# -- inference ---------------------------------------------------------------------


def test_adapters_in_parallel_equal_the_engine_run_directly(client, reference):
    prompts = ["The patient was", "Revenue rose", "Gene expression of", "Question: Is"]
    cases = [(model, adapter, p) for p in prompts for model, adapter in (("alpha", "alpha"), ("fin", "beta"), ("base", None))]
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda c: complete(client, c[0], c[2]), cases))
    for (model, adapter, prompt), response in zip(cases, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == model
        assert body["choices"][0]["text"] == direct(reference, prompt, adapter), (model, prompt)
        assert [a["name"] for a in body["carve"]["adapters"]] == ([adapter] if adapter else [])
        assert body["usage"]["completion_tokens"] > 0
    texts = {r.json()["choices"][0]["text"] for r in responses[:3]}
    assert len(texts) == 3  # the two adapters and the base really differ


def test_chat_completion_applies_the_chat_template(client, reference):
    from carve.engine.text import format_user_prompt

    response = client.post("/v1/chat/completions", json={"model": "bio", "messages": [{"role": "user", "content": "What is DNA?"}], "max_tokens": MAX_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "bio"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": direct(reference, format_user_prompt(reference.tokenizer, "What is DNA?"), "alpha")}


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_sends_the_same_text_as_server_sent_events(client):
    whole = complete(client, "alpha", "The patient was").json()["choices"][0]["text"]
    body = {"model": "alpha", "prompt": "The patient was", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert len(chunks) > 2 and "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-2]["usage"]["completion_tokens"] >= len(chunks) - 1


def test_official_openai_client(server, reference):
    import openai

    api = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    ids = {m.id for m in api.models.list().data}
    assert {"base", "alpha", "beta", "bio", "fin"} <= ids
    completion = api.completions.create(model="beta", prompt="Revenue rose", max_tokens=MAX_TOKENS, temperature=0)
    assert completion.choices[0].text == direct(reference, "Revenue rose", "beta")
    chat = api.chat.completions.create(model="fin", messages=[{"role": "user", "content": "Hi"}], max_tokens=MAX_TOKENS, temperature=0)
    streamed = api.chat.completions.create(model="fin", messages=[{"role": "user", "content": "Hi"}], max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="served models: base, alpha, beta"):
        api.completions.create(model="nope", prompt="x", max_tokens=2)


def test_mixture_equals_the_engine_mixture_rule(client, reference):
    response = complete(client, "auto", "The patient was", carve={"mix": {"alpha": 3, "fin": 1}})  # names and tags, weights normalised
    assert response.status_code == 200, response.text
    carve = response.json()["carve"]
    assert carve["adapters"] == [{"name": "alpha", "version": 1, "weight": 0.75}, {"name": "beta", "version": 1, "weight": 0.25}]
    assert carve["mode"] == "mixture" and carve["space"] == "output"
    text = response.json()["choices"][0]["text"]
    assert text == direct_mix(reference, "The patient was", {"alpha": 0.75, "beta": 0.25})
    assert text != direct(reference, "The patient was", "alpha") or text != direct(reference, "The patient was", "beta")


def test_weight_space_mixture_equals_the_merged_adapter(client, reference):
    from carve.artifact import AdapterRef
    from carve.engine.adapter_cache import AdapterCache
    from carve.engine.decoding import GenerationRequest, Sampling

    response = complete(client, "auto", "Revenue rose", carve={"mix": {"alpha": 1, "beta": 1}, "space": "weights"})
    assert response.status_code == 200, response.text
    assert response.json()["carve"]["space"] == "weights"
    pairs = [(AdapterRef("alpha", 1, ""), 0.5), (AdapterRef("beta", 1, ""), 0.5)]
    merged = AdapterCache(reference, 2, merge_capacity=1).merge(pairs, lambda ref: ref.name)  # the reference engine holds them as alpha, beta
    want = reference.generate([GenerationRequest.single("Revenue rose", merged, Sampling(MAX_TOKENS))])[0].text
    reference.unload_adapter(merged)
    assert response.json()["choices"][0]["text"] == want


def test_auto_routing_reports_its_decision(client):
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "Revenue rose this quarter"}], "max_tokens": 4})
    assert response.status_code == 200, response.text
    carve = response.json()["carve"]
    assert carve["mode"] in ("auto", "base") and carve["reason"].startswith("auto")
    assert [a["name"] for a in carve["adapters"]] in ([], ["alpha"], ["beta"])


def test_routing_errors_name_the_field(client):
    response = complete(client, "alpha", "x", carve={"mix": {"alpha": 1, "beta": 1}})
    assert response.status_code == 400 and error_of(response)["param"] == "model"
    response = complete(client, "auto", "x", carve={"mix": {"alpha": -1}})
    assert response.status_code == 422 and error_of(response)["param"] == "carve.mix"
    response = complete(client, "auto", "x", carve={"mix": {"alpha": 1, "nope": 1}})
    assert response.status_code == 404 and error_of(response)["param"] == "carve.mix.nope"
    response = complete(client, "auto", "x", carve={"space": "both", "mix": {"alpha": 1, "beta": 1}})
    assert response.status_code == 422 and error_of(response)["param"] == "carve.space"


def test_specialization_endpoints(client):
    seeds = '{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c"}\n'
    response = client.post("/v1/specializations", json={"tag": "legal", "seeds": seeds})
    assert response.status_code == 422, response.text
    assert any("seeds line 2" in p and "output" in p for p in error_of(response)["problems"])
    assert client.get("/v1/specializations").json()["data"] == []
    response = client.get("/v1/specializations/job-unknown")
    assert response.status_code == 404 and error_of(response)["code"] == "job_not_found"


# -- errors ----------------------------------------------------------------------------


def test_unknown_model_is_404_listing_models(client):
    response = complete(client, "law", "x")
    assert response.status_code == 404
    assert error_of(response)["param"] == "model" and "served models: base, alpha, beta, bio, fin" in error_of(response)["message"]


def test_malformed_json_and_bad_fields_are_422(client):
    response = client.post("/v1/completions", content=b'{"model": "alpha", "prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "malformed JSON" in error_of(response)["message"]
    response = complete(client, "alpha", "x", n=0)
    assert response.status_code == 422 and error_of(response)["param"] == "n"
    response = client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 422 and error_of(response)["param"] == "messages.0.role"


def test_limits_are_400(client):
    response = complete(client, "alpha", "x", max_tokens=65)
    assert response.status_code == 400 and error_of(response)["param"] == "max_tokens"
    response = complete(client, "alpha", "The patient was treated with aspirin. " * 60, max_tokens=8)
    assert response.status_code == 400 and error_of(response)["code"] == "context_length_exceeded"


def test_broken_adapter_fails_alone_while_the_rest_serve(client, registry, tiny_adapters, tiny_model_dir, reference):
    record = registry.add(tiny_adapters["gamma"], "cracked", tags=["broken"], base=str(tiny_model_dir))
    (record.path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # the files break after registration
    with ThreadPoolExecutor(2) as pool:  # in parallel: likely one batch holding both adapters
        bad, good = pool.map(lambda model: complete(client, model, "The patient"), ["cracked", "alpha"])
    assert bad.status_code == 500 and "cracked@v1 could not be loaded" in error_of(bad)["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == direct(reference, "The patient", "alpha")
    streamed = complete(client, "cracked", "The patient", stream=True)
    assert streamed.status_code == 500 and error_of(streamed)["code"] == "adapter_load_failed"
    assert complete(client, "beta", "Revenue").status_code == 200
    registry.remove("cracked")


# -- operator API ------------------------------------------------------------------------


def test_operator_api_needs_the_token(client):
    for headers in ({}, admin("wrong-token-123"), {"Authorization": "Basic abc"}):
        response = client.get("/v1/adapters", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert client.delete("/v1/adapters/alpha", headers=headers).status_code == 401
        assert client.post("/v1/adapters", json={"name": "x", "path": "/tmp"}, headers=headers).status_code == 401
    listed = client.get("/v1/adapters", headers=admin())
    assert listed.status_code == 200 and {a["name"] for a in listed.json()["data"]} >= {"alpha", "beta"}


def adapter_archive(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=folder.name)
    return buffer.getvalue()


def test_upload_while_serving_is_servable_without_restart(client, tiny_adapters, reference):
    response = client.post(
        "/v1/adapters?name=gamma&tags=law", content=adapter_archive(tiny_adapters["gamma"]),
        headers={**admin(), "content-type": "application/gzip"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "gamma" and response.json()["tags"] == ["law"]
    answer = complete(client, "law", "Gene expression of")
    assert answer.status_code == 200 and answer.json()["carve"]["adapters"] == [{"name": "gamma", "version": 1, "weight": 1.0}]
    assert answer.json()["choices"][0]["text"] == direct(reference, "Gene expression of", "gamma")
    assert "law" in {m["id"] for m in client.get("/v1/models").json()["data"]}


def test_bad_uploads_are_refused(client, tmp_path):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as archive:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    response = client.post("/v1/adapters?name=evil", content=evil.getvalue(), headers={**admin(), "content-type": "application/gzip"})
    assert response.status_code == 400 and "'..'" in error_of(response)["message"]
    response = client.post("/v1/adapters", json={"name": "nowhere", "path": str(tmp_path / "missing")}, headers=admin())
    assert response.status_code == 400 and error_of(response)["param"] == "path"
    response = client.post("/v1/adapters", json={"name": "empty", "path": str(tmp_path)}, headers=admin())
    assert response.status_code == 400 and "adapter_model.safetensors" in error_of(response)["message"]


def test_concurrent_registrations_get_distinct_versions(client, tiny_adapters):
    jobs = [("delta", tiny_adapters["alpha"])] * 4 + [(f"eps{i}", tiny_adapters["beta"]) for i in range(3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda j: client.post("/v1/adapters", json={"name": j[0], "path": str(j[1]), "tags": ["conc"]}, headers=admin()), jobs))
    assert all(r.status_code == 201 for r in responses), [r.text for r in responses]
    assert sorted(r.json()["version"] for r in responses if r.json()["name"] == "delta") == [1, 2, 3, 4]
    listed = {a["name"]: a["version"] for a in client.get("/v1/adapters?tag=conc", headers=admin()).json()["data"]}
    assert listed == {"delta": 4, "eps0": 1, "eps1": 1, "eps2": 1}
    deleted = client.delete("/v1/adapters/delta", headers=admin())
    assert deleted.status_code == 200 and complete(client, "delta", "x").status_code == 404
    assert client.delete("/v1/adapters/delta", headers=admin()).status_code == 404


# -- health and metrics ---------------------------------------------------------------------


def test_health_and_metrics(client):
    assert client.get("/healthz").json()["status"] == "ok"
    for model in ("alpha", "beta", "law", "alpha"):  # three adapters through a 2-adapter cache: evictions
        assert complete(client, model, "The patient").status_code == 200
    text = client.get("/metrics").text
    def value(pattern: str) -> float:
        return sum(float(m) for m in re.findall(pattern + r"\S* (\d+(?:\.\d+)?(?:e[+-]?\d+)?)", text))
    assert value(r'carve_requests_total\{endpoint="completions",status="200"') >= 5
    assert value(r'carve_requests_total\{endpoint="completions",status="404"') >= 1
    assert value(r'carve_tokens_total\{kind="completion"') > 0
    assert value(r"carve_request_latency_seconds_count") >= 5
    assert value(r"carve_time_to_first_token_seconds_count") >= 1
    assert value(r"carve_adapter_loads_total") >= 3 and value(r"carve_adapter_evictions_total") >= 1
    assert value(r"carve_adapter_load_failures_total") >= 1
    assert value(r'carve_routing_decisions_total\{mode="mixture",space="output",target="alpha\+beta"') >= 1
    assert value(r'carve_routing_decisions_total\{mode="explicit",space="single",target="alpha"') >= 3
    drafted, accepted = value(r'carve_engine_draft_tokens\{kind="drafted"'), value(r'carve_engine_draft_tokens\{kind="accepted"')
    assert 0 < accepted <= drafted  # greedy requests drafted from their own text; the tokens above are still the direct engine's

# Keyed inference (CARVE_API_KEY) is tested with `carve serve` itself in test_serving_cli.py.


# -- fuzzing ------------------------------------------------------------------------------------


def _random_value(rng, depth: int = 0) -> Any:
    """A random JSON value: every type, huge numbers, NUL bytes and odd text, nested a little."""
    kinds = ["null", "bool", "int", "huge", "float", "text", "nul", "list", "object"][: 7 if depth > 2 else 9]
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([-1, 0, 1, 2, 7, 2**31, -(2**63)])
    if kind == "huge":
        return rng.choice([10**400, -(10**400), 1e308, -1e308, 2**64 + 1])
    if kind == "float":
        return rng.choice([0.5, -0.0, 3.7, 1e-320, 1e20])
    if kind == "text":
        return rng.choice(["", "base", "alpha", "user", "\u202e\u0000x", "🙂" * 50, "a" * 5000])
    if kind == "nul":
        return "\x00" * rng.randint(1, 40)
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["model", "prompt", "messages", "role", "content", "x", "max_tokens", "n"]): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _fuzz_bodies(rng, valid: dict[str, Any], count: int) -> Iterator[bytes]:
    """Bodies made from ``valid``: a field replaced, a field dropped, an unknown key, or a random document."""
    for _ in range(count):
        body = json.loads(json.dumps(valid))
        action = rng.choice(["replace", "replace", "drop", "extra", "random"])
        key = rng.choice(list(body))
        if action == "replace":
            body[key] = _random_value(rng)
        elif action == "drop":
            del body[key]
        elif action == "extra":
            body[rng.choice(["logprobs", "echo", "n", "stop", "seed", "carve", "tools", "zzz"])] = _random_value(rng)
        else:
            body = _random_value(rng)
        yield json.dumps(body).encode()


def test_fuzzed_bodies_get_only_4xx_and_the_server_keeps_serving(client):
    import random

    rng = random.Random(20261203)
    valid = {
        "/v1/completions": {"model": "alpha", "prompt": "The patient", "max_tokens": 3, "temperature": 0},
        "/v1/chat/completions": {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        "/tokenize": {"prompt": "The patient"},
        "/detokenize": {"tokens": [1, 2, 3]},
        "/v1/adapters": {"name": "fuzzed", "path": "/nonexistent", "tags": ["x"]},
    }
    extremes = [
        b"[" * 5000 + b"]" * 5000,  # nesting deeper than any parser's recursion
        json.dumps({"model": "alpha", "prompt": "x" * (10 << 20), "max_tokens": 1}).encode(),  # a 10 MB string
        json.dumps({"model": "alpha", "prompt": "a\x00b", "max_tokens": 2, "stop": ["\x00"]}).encode(),
        b'{"model": "alpha", "prompt": "x", "max_tokens": NaN}', b"\xff\xfe not utf-8", b"", b"null", b"42",
    ]
    statuses: dict[int, int] = {}
    for path, body in valid.items():
        headers = {"Content-Type": "application/json", **(admin() if path == "/v1/adapters" else {})}
        for raw in [*_fuzz_bodies(rng, body, 40), *extremes]:
            reply = client.post(path, content=raw, headers=headers)
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            assert reply.status_code < 500, (path, raw[:200], reply.status_code, reply.text[:300])
            if reply.status_code >= 400:
                assert "error" in reply.json()
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 100, statuses
    assert complete(client, "alpha", "The patient was").status_code == 200  # still serving
    assert '"fuzzed"' not in client.get("/v1/adapters", headers=admin()).text  # nothing registered by a fuzzed body

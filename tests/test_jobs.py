"""Specialization jobs on the tiny model: submission checks, the whole lifecycle on Ray, cancel, restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

SEED_RECORDS = [
    {"instruction": "Name the disease in the sentence.", "input": "The child had measles.", "output": "measles", "task": "ner"},
    {"instruction": "Is the drug used for diabetes?", "input": "Metformin lowers blood sugar.", "output": "yes", "task": "qa"},
    {"instruction": "Name the gene in the sentence.", "input": "BRCA1 was measured in tissue.", "output": "BRCA1", "task": "ner"},
    {"instruction": "What treatment was given to the patient?", "input": "The patient was treated with aspirin.", "output": "aspirin", "task": "qa"},
]
SEEDS = "".join(json.dumps(s) + "\n" for s in SEED_RECORDS)
CORPUS = "".join(
    json.dumps({"id": f"d{i}", "title": title, "text": text}) + "\n"
    for i, (title, text) in enumerate([
        ("Aspirin", "The patient was treated with aspirin and recovered within two weeks."),
        ("BRCA1", "Gene expression of BRCA1 was measured in breast cancer tissue samples."),
        ("Metformin", "Metformin is used for type 2 diabetes and lowers blood sugar."),
        ("Measles", "The child had measles and recovered."),
    ])
)
# Stage 1 "generated" these (a random tiny model never writes a parseable list; see PreseededLauncher).
GENERATED = [
    ("Which gene was measured in the samples?", "Gene expression of BRCA1 was measured in breast cancer tissue samples."),
    ("Say whether the patient recovered after treatment.", "The patient was treated with aspirin and recovered within two weeks."),
    ("Extract the drug named in the text.", "Metformin is used for type 2 diabetes."),
    ("List the diseases mentioned below.", "The child had measles and the tumour grew."),
]
SETTINGS: dict[str, Any] = dict(
    num_instructions=4, instruction_batch=2, instruction_max_new_tokens=16, max_prompts=4, prompt_style="raw",
    top_k=2, document_words=20, response_batch=4, response_max_new_tokens=4,
    training={"epochs": 1, "batch_size": 2, "micro_batch_size": 2, "max_length": 400, "save_every_steps": 1},
)


def preseed_generations(job: Any) -> None:
    """Leave the job's run folder as a run interrupted after stage 1 leaves it: manifest + generations.jsonl.

    The pipeline then resumes from it for real: filters, retrieval, responses,
    training, packaging and registration all run on the tiny model.
    """
    from carve.specialize.config import build_config
    from carve.specialize.run import Manifest, prepare

    config = build_config(job.request["profile"], base=job.base, **job.request["settings"])
    inputs = prepare(config, job.seeds_dir, job.corpus, job.run_dir, resume=True)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    Manifest.open(inputs)
    lines = []
    for prompt in range(2):
        (a, a_in), (b, b_in) = GENERATED[2 * prompt], GENERATED[2 * prompt + 1]
        text = f" {a}\n4. Input: {a_in}\n5. Instruction: {b}\n5. Input: {b_in}\n\n"
        lines.append({"prompt": prompt, "seeds": [0, 1, 2], "text": text, "finish_reason": "eos", "tokens": 40})
    (job.run_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


class PreseededLauncher:
    """Wraps a real launcher: writes stage 1's output into the run folder, then launches the job as usual."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.background = inner.background

    def launch(self, root: Path, job_id: str, settings: Any, database: str) -> None:
        from carve.jobs.store import JobStore

        job = JobStore(root, database).get(job_id)
        if not (job.run_dir / "generations.jsonl").exists():
            preseed_generations(job)
        self.inner.launch(root, job_id, settings, database)

    def cancel(self, job_id: str) -> None:
        self.inner.cancel(job_id)

    def crashed(self) -> dict[str, str]:
        return self.inner.crashed()


# -- fixtures ----------------------------------------------------------------------

import time  # noqa: E402

import pytest  # noqa: E402

from carve.jobs.http import JobsHttp  # noqa: E402
from carve.jobs.service import InlineLauncher, JobRejected, JobService, JobSettings  # noqa: E402
from carve.jobs.store import JobConflict, JobNotFound, JobStore  # noqa: E402

FAST = JobSettings(num_cpus=1, heartbeat_s=0.5, stale_after_s=2.0)


EVAL_TASKS = "".join(
    json.dumps({"id": f"e{i}", "task": task, "instruction": instruction, "input": text, "output": answer, "answers": [answer]}) + "\n"
    for i, (task, instruction, text, answer) in enumerate([
        ("qa", "Is the drug used for diabetes?", "Insulin lowers blood sugar.", "yes"),
        ("ner", "Name the disease in the sentence.", "The girl had mumps.", "mumps"),
    ])
)


def request(tag: str = "tinybio", **extra: Any) -> dict[str, Any]:
    return {"tag": tag, "seeds": SEEDS, "domain": {"name": "biomedical"}, "corpus": {"jsonl": CORPUS}, "settings": SETTINGS, **extra}


def nothing_stored(root: Path) -> bool:
    jobs = root / "jobs"
    return JobStore(root).list() == [] and (not jobs.exists() or not any(jobs.iterdir()))


# -- submissions refused before any job exists -------------------------------------------


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"seeds": SEEDS + '{"instruction": "x", "input": ""}\nnot json\n'}, "seeds", ["seeds line 5: field 'output': is required", "seeds line 6: invalid JSON"]),
        ({"tag": "auto"}, "tag", ["reserved"]),
        ({"tag": "no spaces"}, "tag", ["domain tag"]),
        ({"settings": {**SETTINGS, "num_instructions": 0}}, "settings", ["settings.num_instructions"]),
        ({"settings": {"base": "other"}}, "settings", ["settings.base"]),
        ({"settings": {"nonsense": 1}}, "settings", ["settings.nonsense"]),
        ({"corpus": {"path": "/nowhere/corpus.jsonl"}}, "corpus", ["/nowhere/corpus.jsonl: no such file"]),
        ({"corpus": {"jsonl": '{"id": "d1"}\n'}}, "corpus", ["line 1"]),
        ({"corpus": None}, "corpus", ["a corpus is needed for retrieval"]),
        ({"corpus": {"path": "a", "jsonl": "b"}}, "corpus", ["exactly one of corpus.path"]),
        ({"profile": "huge"}, "profile", ["Input should be 'quick' or 'paper'"]),
        ({"evaluation": {"jsonl": EVAL_TASKS + '{"id": "x", "task": "qa"}\n'}}, "evaluation", ["line 3"]),
        ({"evaluation": {"path": "/nowhere/tasks"}}, "evaluation", ["/nowhere/tasks: no such folder or file"]),
        ({"evaluation": {"jsonl": EVAL_TASKS, "shots": [9]}}, "evaluation", ["k=9 needs that many seeds"]),
        ({"evaluation": {"jsonl": EVAL_TASKS, "path": "/x"}}, "evaluation", ["exactly one of evaluation.path"]),
    ],
)
def test_bad_submission_is_refused_with_every_problem(tiny_model_dir: Path, tmp_path: Path, change: dict, param: str, words: list[str]) -> None:
    root = tmp_path / "registry"
    service = JobService(root, str(tiny_model_dir), InlineLauncher(), FAST)
    with pytest.raises(JobRejected) as err:
        service.submit({**request(), **change})
    assert err.value.param == param
    for word in words:
        assert any(word in p for p in err.value.problems), err.value.problems
    assert nothing_stored(root)
    status, body = JobsHttp(service).submit(json.dumps({**request(), **change}).encode())
    assert status == 422 and body["error"]["param"] == param and body["error"]["problems"] == err.value.problems
    assert nothing_stored(root)


def test_http_errors_for_unknown_and_finished_jobs(tiny_model_dir: Path, tmp_path: Path, database: Optional[str]) -> None:
    root = tmp_path / "registry"
    http = JobsHttp(JobService(root, str(tiny_model_dir), InlineLauncher(), FAST, database=database))
    assert http.get("job-nope")[0] == 404 and http.cancel("job-nope")[0] == 404
    assert http.submit(b"{not json")[0] == 422
    assert http.list() == (200, {"object": "list", "data": []})
    store = JobStore(root, database)
    store.create("job-x", "t", {"profile": "quick", "settings": {}}, "base", root / "jobs" / "job-x", None)
    assert store.cancel("job-x").status == "cancelled"
    status, body = http.cancel("job-x")
    assert status == 409 and "already cancelled" in body["error"]["message"]
    with pytest.raises(JobNotFound):
        store.get("job-y")
    with pytest.raises(JobConflict):
        store.cancel("job-x")


def test_progress_is_monotonic_over_the_stages() -> None:
    from carve.jobs.runner import stage_progress

    points = [
        stage_progress("load model", 0, 1, 1),
        stage_progress("instructions (iteration 1)", 0.5, 1, 1),
        stage_progress("retrieval", 1.0, 1, 1),
        stage_progress("responses (iteration 1)", 0.5, 1, 1),
        stage_progress("training (iteration 1)", 1.0, 1, 1),
        stage_progress("register", 1.0, 1, 1),
    ]
    assert points == sorted(points) and points[0] == 0 and points[-1] == pytest.approx(1.0)
    assert stage_progress("training (iteration 1)", 1.0, 1, 2) < stage_progress("instructions (iteration 2)", 0.1, 2, 2)
    # with stage 0 (the quick profile): seed training comes once, between loading and the first instructions
    seeded = [
        stage_progress("load model", 1.0, 1, 2, True),
        stage_progress("seed training (stage 0)", 0.5, 1, 2, True),
        stage_progress("instructions (iteration 1)", 0.0, 1, 2, True),
        stage_progress("training (iteration 1)", 1.0, 1, 2, True),
        stage_progress("instructions (iteration 2)", 0.1, 2, 2, True),
        stage_progress("register", 1.0, 1, 2, True),
    ]
    assert seeded == sorted(seeded) and seeded[-1] == pytest.approx(1.0)
    assert stage_progress("training (iteration 2)", 1.0, 2, 2, True) == pytest.approx(stage_progress("register", 0.0, 1, 2, True))


# -- the store: claims, heartbeats, conditional writes, on SQLite and PostgreSQL ----------------------


def new_job(store: JobStore, job_id: str = "job-a") -> Any:
    return store.create(job_id, "tinybio", {"profile": "quick", "settings": {}}, "base", store.jobs_dir / job_id, None)


def test_claims_heartbeats_and_conditional_writes(tmp_path: Path, database: Optional[str]) -> None:
    store = JobStore(tmp_path / "registry", database)
    job = new_job(store)
    assert (job.status, job.stage, job.attempt, job.runner) == ("queued", "queued", 0, None)
    claimed = store.claim(job.id, "runner-1", stale_after_s=60)
    assert claimed is not None and (claimed.status, claimed.stage, claimed.attempt, claimed.runner) == ("running", "starting", 1, "runner-1")
    assert store.claim(job.id, "runner-2", stale_after_s=60) is None  # runner-1 is alive
    assert store.report(job.id, "runner-1", "training (iteration 1)", 0.123456, "step 1/4")
    assert store.heartbeat(job.id, "runner-1") and not store.heartbeat(job.id, "runner-2")
    assert not store.report(job.id, "runner-2", "training", 0.9, None)  # not its claim: nothing written
    seen = store.get(job.id)
    assert (seen.stage, seen.progress, seen.detail) == ("training (iteration 1)", 0.1235, "step 1/4")

    # runner-1 goes silent: a resumed runner takes over, and the old one's writes change nothing
    resumed = store.claim(job.id, "runner-2", stale_after_s=0)
    assert resumed is not None and (resumed.attempt, resumed.runner, resumed.detail) == (2, "runner-2", "resuming from the run folder")
    assert not store.succeed(job.id, "runner-1", "tinybio", 1) and not store.fail(job.id, "runner-1", "late")
    assert store.succeed(job.id, "runner-2", "tinybio", 1)
    done = store.get(job.id)
    assert (done.status, done.progress, done.adapter_name, done.adapter_version) == ("succeeded", 1.0, "tinybio", 1)
    assert done.finished_at is not None and store.claim(job.id, "runner-3", stale_after_s=0) is None
    with pytest.raises(JobConflict, match="already succeeded"):
        store.cancel(job.id)

    # a cancelled job: its runner's next write fails, so it stops; the service's fail(None) does not overwrite it
    other = new_job(store, "job-b")
    assert store.claim(other.id, "runner-9", stale_after_s=60) is not None
    assert store.cancel(other.id).status == "cancelled"
    assert not store.report(other.id, "runner-9", "x", 0.5, None) and not store.heartbeat(other.id, "runner-9")
    assert not store.fail(other.id, None, "worker died") and store.get(other.id).status == "cancelled"

    queued = new_job(store, "job-c")
    assert [j.id for j in store.orphaned(stale_after_s=0)] == [queued.id]  # never started; finished jobs are not orphans
    assert store.fail(queued.id, None, "gave up") and store.get(queued.id).error == "gave up"
    assert [j.id for j in store.list()] == ["job-c", "job-b", "job-a"] and [j.id for j in store.list("cancelled")] == ["job-b"]


class CrashingLauncher:
    """Launches nothing; reports the jobs in ``crashes`` as crashed once (their worker died: a lost node)."""

    background = True

    def __init__(self) -> None:
        self.launched: list[str] = []
        self.crashes: dict[str, str] = {}

    def launch(self, root: Path, job_id: str, settings: Any, database: str) -> None:
        self.launched.append(job_id)

    def cancel(self, job_id: str) -> None:
        pass

    def crashed(self) -> dict[str, str]:
        out, self.crashes = self.crashes, {}
        return out


def test_a_job_whose_worker_died_is_resumed_once_its_heartbeat_is_stale_until_out_of_attempts(tiny_model_dir: Path, tmp_path: Path) -> None:
    launcher = CrashingLauncher()
    settings = JobSettings(heartbeat_s=0.1, stale_after_s=0.6, max_attempts=2)
    service = JobService(tmp_path / "registry", str(tiny_model_dir), launcher, settings)
    job = service.submit(request())
    assert launcher.launched == [job.id]
    assert service.store.claim(job.id, "runner-1", settings.stale_after_s) is not None  # the first runner starts on a node

    launcher.crashes = {job.id: "NodeDiedError: the node running it died"}
    assert service.get(job.id).status == "running" and launcher.launched == [job.id]  # its heartbeat is fresh: no second runner yet
    time.sleep(settings.stale_after_s)
    assert service.get(job.id).status == "running" and launcher.launched == [job.id, job.id]  # relaunched, resuming its run folder

    assert service.store.claim(job.id, "runner-2", settings.stale_after_s).attempt == 2
    launcher.crashes = {job.id: "ActorDiedError: the worker was killed"}
    failed = service.get(job.id)
    assert failed.status == "failed" and "worker died (ActorDiedError" in failed.error and "attempt 2 of 2" in failed.error
    assert launcher.launched == [job.id, job.id]


def _claim(root: str, database: str, job_id: str, token: str, barrier: Any, won: Any) -> None:
    store = JobStore(Path(root), database)
    barrier.wait()
    if store.claim(job_id, token, stale_after_s=600) is not None:
        won.put(token)


def test_concurrent_claims_in_real_processes_have_one_winner(tmp_path: Path, database: Optional[str]) -> None:
    import multiprocessing

    from carve.common.database import database_url

    root = tmp_path / "registry"
    url = database_url(database, root)
    store = JobStore(root, url)
    job = new_job(store)
    ctx = multiprocessing.get_context("spawn")
    barrier, won = ctx.Barrier(4, timeout=60), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(root), url, job.id, f"runner-{i}", barrier, won)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    winner = won.get(timeout=5)
    assert won.empty()
    claimed = store.get(job.id)
    assert (claimed.runner, claimed.attempt, claimed.status) == (winner, 1, "running")


def test_job_tables_of_a_newer_carve_are_refused(tmp_path: Path, database: Optional[str]) -> None:
    from carve.common.database import SchemaError, schema_migrations

    store = JobStore(tmp_path / "registry", database)
    with store.database.engine.begin() as conn:
        conn.execute(schema_migrations.insert().values(component="jobs", version=2, applied_at="later"))
    with pytest.raises(SchemaError, match="jobs tables in .* are at schema version 2, newer than this Carve supports \\(1\\)"):
        JobStore(tmp_path / "registry", database)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)  # SQLite: the Ray lifecycle test below
def test_a_job_runs_and_registers_in_the_configured_database(tiny_model_dir: Path, tmp_path: Path, database: Optional[str]) -> None:
    """The service hands its database to the runner: the job's record and its adapter land in PostgreSQL, no SQLite file appears."""
    from carve.adapters.registry import Registry

    root = tmp_path / "registry"
    service = JobService(root, str(tiny_model_dir), PreseededLauncher(InlineLauncher()), FAST, recover=False, database=database)
    done = service.submit(request("tinybio"))  # runs to its end here
    assert done.status == "succeeded", done.error
    record = Registry(root, database).resolve("tinybio")
    assert (done.adapter_name, done.adapter_version) == (record.name, record.version) == ("tinybio", 1)
    assert (record.path / "adapter_model.safetensors").is_file() and not (root / "registry.sqlite3").exists()


def test_a_job_with_evaluation_tasks_registers_the_better_adapter_and_says_why(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The safety net: the seeds-only and the self-specialized adapter scored on the tasks, the better one registered, the choice in the view and the card."""
    from carve.adapters.registry import Registry
    from carve.jobs.api import JobView
    from carve.specialize.run import SEED_ADAPTER

    root = tmp_path / "registry"
    service = JobService(root, str(tiny_model_dir), PreseededLauncher(InlineLauncher()), FAST, recover=False)
    done = service.submit(request("tinyeval", evaluation={"jsonl": EVAL_TASKS, "shots": [0, 1]}))
    assert done.status == "succeeded", done.error
    view = JobView.of(done)
    assert view.choice is not None and view.choice.chosen in ("seeds_only", "self_specialized")
    scores = view.choice.macro_f1
    assert set(scores) == {"base", "seeds_only", "self_specialized"} and "seeds-only" in view.choice.reason
    assert view.choice.chosen == ("self_specialized" if scores["self_specialized"] >= scores["seeds_only"] else "seeds_only")
    record = Registry(root).resolve("tinyeval")
    card = json.loads((record.path / "carve-card.json").read_text())
    assert card["evaluation"]["choice"] == view.choice.model_dump() | {"gain_over_seeds_only": card["evaluation"]["choice"]["gain_over_seeds_only"]}
    assert {g["k"] for g in card["evaluation"]["choice"]["gain_over_seeds_only"]} == {0, 1}
    chosen = done.run_dir / (SEED_ADAPTER + "/final" if view.choice.chosen == "seeds_only" else "train/final")
    assert (record.path / "adapter_model.safetensors").read_bytes() == (chosen / "adapter_model.safetensors").read_bytes()
    assert (done.run_dir / "evaluation" / "report.md").is_file()


# -- the lifecycle on Ray --------------------------------------------------------------------


def wait_for(service: JobService, job_id: str, done: Any, timeout: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = service.get(job_id)
        if done(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"timed out; job is {service.get(job_id)}")


@pytest.mark.ray
def test_job_lifecycle_on_ray_cancel_and_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """submit -> running (stage, progress) -> server dies mid-run -> restarted server resumes -> succeeded, registered, served;
    a second job is cancelled while it runs and leaves no adapter."""
    import ray

    from carve.adapters.registry import AdapterNotFound, Registry
    from carve.jobs.service import RayLauncher

    root = tmp_path / "registry"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        service = JobService(root, str(tiny_model_dir), PreseededLauncher(RayLauncher()), FAST)
        doomed = service.submit(request("tinycancel"))
        # more epochs than the other tests: the tiny job must still be running when the server dies
        slow = {**SETTINGS, "training": {**SETTINGS["training"], "epochs": 4}}
        job = service.submit(request("tinybio", settings=slow))
        assert job.status in ("queued", "running") and (root / "jobs" / job.id / "seeds" / "seeds.jsonl").is_file()

        running = wait_for(service, doomed.id, lambda j: j.status == "running" and j.stage not in ("queued", "starting"))
        cancelled = service.cancel(doomed.id)
        assert cancelled.status == "cancelled"

        # seed training (stage 0) is the first stage with real work and the longest: the server dies with most of the run ahead
        seen = wait_for(service, job.id, lambda j: j.stage.startswith(("seed training", "responses", "training")) or j.status not in ("queued", "running"))
        assert seen.status == "running" and 0 < seen.progress < 1 and seen.detail, seen
        assert running.progress >= 0
    finally:
        ray.shutdown()  # the server and its workers die mid-run
    assert JobStore(root).get(job.id).status == "running"  # left behind by the dead server

    time.sleep(FAST.stale_after_s)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        restarted = JobService(root, str(tiny_model_dir), RayLauncher(), FAST)  # recovers on start
        done = wait_for(restarted, job.id, lambda j: j.status not in ("queued", "running"))
        assert done.status == "succeeded", done.error
        assert done.attempt == 2 and (done.adapter_name, done.adapter_version) == ("tinybio", 1) and done.progress == 1.0
        assert restarted.get(doomed.id).status == "cancelled"
    finally:
        ray.shutdown()

    registry = Registry(root)
    record = registry.resolve("tinybio")
    assert record.tags == ["tinybio"] and (record.path / "carve-profile.jsonl").is_file()
    with pytest.raises(AdapterNotFound):
        registry.resolve("tinycancel")
    # served with no restart: a live engine loads it straight from the registry and decodes with it
    from carve.engine.decoding import GenerationRequest, Sampling
    from carve.engine.loading import open_engine

    engine, _, _ = open_engine(str(tiny_model_dir), [("tinybio", record.path)])
    assert engine.generate([GenerationRequest.single("The patient", "tinybio", Sampling(max_new_tokens=2))])[0].token_ids


def test_job_outlives_the_replica_that_launched_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A gateway replica launches a job and dies: the job runs on to success, once, and its actor then goes away."""
    import ray

    from carve.jobs.service import RayLauncher

    @ray.remote(num_cpus=0)
    class Replica:  # stands for the HTTP replica: the launcher lives (and dies) in it
        def launch(self, root: str, job_id: str, settings: Any, database: str) -> None:
            from carve.jobs.service import RayLauncher

            self.launcher = RayLauncher()
            self.launcher.launch(Path(root), job_id, settings, database)

    class ThroughReplica:
        background = True

        def __init__(self) -> None:
            self.replica = Replica.remote()

        def launch(self, root: Path, job_id: str, settings: Any, database: str) -> None:
            if self.replica is None:  # the replica is gone: its successor launches (a no-op while the job's actor lives)
                RayLauncher().launch(root, job_id, settings, database)
                return
            preseed_generations(JobStore(root, database).get(job_id))
            ray.get(self.replica.launch.remote(str(root), job_id, settings, database))

        def kill_replica(self) -> None:
            ray.kill(self.replica)
            self.replica = None

        def cancel(self, job_id: str) -> None:
            raise AssertionError("not cancelled in this test")

        def crashed(self) -> dict[str, str]:
            return {}

    root = tmp_path / "registry"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        launcher = ThroughReplica()
        service = JobService(root, str(tiny_model_dir), launcher, FAST)
        job = service.submit(request("tinybio"))
        wait_for(service, job.id, lambda j: j.status == "running" and j.stage not in ("queued", "starting"))
        launcher.kill_replica()  # Serve would now start a new replica; the job must not notice
        done = wait_for(service, job.id, lambda j: j.status not in ("queued", "running"))
        assert done.status == "succeeded", done.error
        assert done.attempt == 1  # never restarted: it ran through
        deadline = time.monotonic() + 30
        while RayLauncher()._live_actor(job.id) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert RayLauncher()._live_actor(job.id) is None  # the actor removed itself
    finally:
        ray.shutdown()

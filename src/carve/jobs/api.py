"""The HTTP contract of specialization jobs (``/v1/specializations``), shared by the server and ``carve submit``.

- ``POST /v1/specializations`` with :class:`SpecializationRequest` -> 202 and a :class:`JobView`;
  a bad submission -> 422 :class:`ErrorBody` whose ``problems`` list every bad seed line or field.
- ``GET /v1/specializations`` -> :class:`JobList` (newest first; ``?status=running`` filters).
- ``GET /v1/specializations/{id}`` -> :class:`JobView`: status, stage, progress, errors, the adapter made.
- ``DELETE /v1/specializations/{id}`` -> :class:`JobView` with status ``cancelled``; 409 when it already finished.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from carve.jobs.store import JobRecord, Status
from carve.specialize.run import recorded_choice


class DomainInfo(BaseModel):
    """The domain.json of the seed set, apart from its tag (the request's ``tag``)."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = Field(None, description="The phrase the prompts insert ('biomedical', 'financial'); default: the tag.")
    description: Optional[str] = Field(None, description="One line about the domain, for people.")


class CorpusSpec(BaseModel):
    """The unlabelled domain corpus for retrieval: a file on the server (``path``) or the JSONL text itself (``jsonl``)."""

    model_config = ConfigDict(extra="forbid")

    path: Optional[str] = None
    jsonl: Optional[str] = None

    @model_validator(mode="after")
    def _one(self) -> "CorpusSpec":
        if (self.path is None) == (self.jsonl is None):
            raise ValueError("give exactly one of corpus.path (a file on the server) or corpus.jsonl (the corpus itself)")
        return self


class EvaluationSpec(BaseModel):
    """Evaluation tasks for the safety net: the run scores the seeds-only and the self-specialized adapter on them and registers the better.

    The tasks are a file or folder on the server (``path``) or the JSONL text itself (``jsonl``: lines of
    {id, task, instruction, input, output, answers}, several tasks in one text).
    """

    model_config = ConfigDict(extra="forbid")

    path: Optional[str] = None
    jsonl: Optional[str] = None
    shots: list[int] = Field(default_factory=lambda: [0], min_length=1, description="Demonstrations per prompt (the job's seeds), e.g. [0, 5].")
    limit: Optional[int] = Field(None, ge=1, description="First N examples of each task.")

    @model_validator(mode="after")
    def _one(self) -> "EvaluationSpec":
        if (self.path is None) == (self.jsonl is None):
            raise ValueError("give exactly one of evaluation.path (tasks on the server) or evaluation.jsonl (the tasks themselves)")
        if any(k < 0 or k > 20 for k in self.shots) or len(set(self.shots)) != len(self.shots):
            raise ValueError(f"evaluation.shots must be distinct numbers from 0 to 20, got {self.shots}")
        return self


class SpecializationRequest(BaseModel):
    """A domain team's submission: seeds (the text of a seeds.jsonl), a domain tag, an optional corpus, a profile."""

    model_config = ConfigDict(extra="forbid")

    tag: str = Field(..., min_length=1, description="Domain tag; the adapter is registered under it (name and tag).")
    seeds: str = Field(..., description="JSONL: one {instruction, input, output, task} object per line.")
    domain: DomainInfo = Field(default_factory=DomainInfo)
    corpus: Optional[CorpusSpec] = None
    profile: Literal["quick", "paper"] = "quick"
    settings: dict[str, Any] = Field(default_factory=dict, description="Overrides of the profile (carve.specialize.config.RunConfig fields).")
    evaluation: Optional[EvaluationSpec] = None


class AdapterMade(BaseModel):
    name: str
    version: int


class AdapterChoice(BaseModel):
    """With evaluation tasks: which adapter was registered, the seeds-only or the self-specialized one, and why."""

    chosen: Literal["seeds_only", "self_specialized"]
    macro_f1: dict[str, float]
    reason: str


class JobView(BaseModel):
    """A job as clients see it."""

    id: str
    object: Literal["specialization.job"] = "specialization.job"
    tag: str
    status: Status
    stage: str
    progress: float = Field(..., description="0..1 over the whole pipeline.")
    detail: Optional[str] = Field(None, description="Within the current stage, e.g. '12/40 responses'.")
    error: Optional[str] = None
    attempt: int
    profile: str
    adapter: Optional[AdapterMade] = None
    choice: Optional[AdapterChoice] = None
    created_at: str
    updated_at: str
    finished_at: Optional[str] = None

    @classmethod
    def of(cls, job: JobRecord) -> "JobView":
        adapter = AdapterMade(name=job.adapter_name, version=job.adapter_version) if job.adapter_name and job.adapter_version else None
        return cls(
            id=job.id, tag=job.tag, status=job.status, stage=job.stage, progress=job.progress, detail=job.detail, error=job.error,
            attempt=job.attempt, profile=str(job.request.get("profile", "")), adapter=adapter, choice=_choice(job) if adapter else None,
            created_at=job.created_at.isoformat(), updated_at=job.updated_at.isoformat(),
            finished_at=job.finished_at.isoformat() if job.finished_at else None,
        )


def _choice(job: JobRecord) -> Optional[AdapterChoice]:
    """The evaluation's choice as the run recorded it in its manifest (None when the job did not evaluate)."""
    choice = recorded_choice(job.run_dir)
    return AdapterChoice.model_validate(choice) if choice else None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: Optional[str] = None
    code: Optional[str] = None
    problems: list[str] = Field(default_factory=list, description="Every problem found (seed lines, fields).")


class ErrorBody(BaseModel):
    """OpenAI's error shape, plus ``problems``."""

    error: ErrorDetail

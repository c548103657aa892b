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


class SpecializationRequest(BaseModel):
    """A domain team's submission: seeds (the text of a seeds.jsonl), a domain tag, an optional corpus, a profile."""

    model_config = ConfigDict(extra="forbid")

    tag: str = Field(..., min_length=1, description="Domain tag; the adapter is registered under it (name and tag).")
    seeds: str = Field(..., description="JSONL: one {instruction, input, output, task} object per line.")
    domain: DomainInfo = Field(default_factory=DomainInfo)
    corpus: Optional[CorpusSpec] = None
    profile: Literal["quick", "paper"] = "quick"
    settings: dict[str, Any] = Field(default_factory=dict, description="Overrides of the profile (carve.specialize.config.RunConfig fields).")


class AdapterMade(BaseModel):
    name: str
    version: int


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
    created_at: str
    updated_at: str
    finished_at: Optional[str] = None

    @classmethod
    def of(cls, job: JobRecord) -> "JobView":
        adapter = AdapterMade(name=job.adapter_name, version=job.adapter_version) if job.adapter_name and job.adapter_version else None
        return cls(
            id=job.id, tag=job.tag, status=job.status, stage=job.stage, progress=job.progress, detail=job.detail, error=job.error,
            attempt=job.attempt, profile=str(job.request.get("profile", "")), adapter=adapter,
            created_at=job.created_at.isoformat(), updated_at=job.updated_at.isoformat(),
            finished_at=job.finished_at.isoformat() if job.finished_at else None,
        )


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

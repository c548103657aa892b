"""The settings of one Carve server, validated once and shipped to every replica."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carve.engine.models import DEFAULT_MODEL
from carve.jobs.settings import JobSettings

ADMIN_TOKEN_ENV = "CARVE_ADMIN_TOKEN"
API_KEY_ENV = "CARVE_API_KEY"


class ServeConfig(BaseModel):
    """Everything a gateway or engine replica needs; plain data so Ray can pickle it.

    Tokens and the database default to the environment (CARVE_ADMIN_TOKEN,
    CARVE_API_KEY, CARVE_DATABASE_URL) of the process that builds the config, so
    replicas on other nodes get the same values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="Base model name or Hugging Face folder.")
    registry_root: Optional[Path] = Field(None, description="Adapter registry folder (default: CARVE_REGISTRY or ~/.carve/registry).")
    database_url: Optional[str] = Field(
        None, repr=False,  # may hold a password
        description="Database of the registry and the jobs: postgresql://USER:PASSWORD@HOST/DB on a cluster "
        "(default: CARVE_DATABASE_URL, else the SQLite file registry.sqlite3 in the registry folder).",
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="CUDA: a 4-bit base computing in bf16 (auto), or the whole model in bf16/fp32. CPU: an fp32 model decoding on its "
        "own weights (auto, fp32), or on bf16 or int8 copies of them (faster, answers not the same: docs/results).",
    )
    replicas: int = Field(1, ge=1, le=64, description="Engine replicas, each holding the base model once.")
    max_adapters: int = Field(8, ge=1, le=1024, description="Adapters held per replica (LRU).")
    batching: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: requests join and leave the running batch at every decoding step; "
        "static: one batch decoded to its end before the next starts (for comparison).",
    )
    max_batch_size: int = Field(32, ge=1, le=512, description="Sequences decoded together per replica (a mixture has one per adapter).")
    max_step_tokens: int = Field(512, ge=1, le=65536, description="Tokens run per decoding step (continuous): longer prompts are read in chunks.")
    max_step_ms: Optional[float] = Field(
        None, gt=0, le=600000, description="Inter-token target while rows decode (continuous): a step's prefill chunk is cut to what fits beside "
        "the decode in this time, by the costs the replica measures (at least 16 prompt tokens a step); default: the token budget alone.",
    )
    draft_tokens: int = Field(
        0, ge=0, le=16, description="Speculative decoding by prompt lookup: tokens drafted from a request's own text and checked in one pass "
        "while at most draft_max_rows sequences decode (the same tokens, more per pass when the text repeats itself or its prompt); 0: off.",
    )
    draft_max_rows: int = Field(4, ge=1, le=512, description="Sequences decoding above which no drafts are made (a wide step is bound by arithmetic).")
    max_waiting: int = Field(128, ge=0, le=100000, description="Requests queued per replica (continuous); more get 429 with Retry-After.")
    batch_wait_s: float = Field(0.02, ge=0.0, le=5.0, description="How long a static batch waits to fill after its first request.")
    default_max_tokens: int = Field(128, ge=1)
    max_tokens_cap: int = Field(1024, ge=1, description="Requests asking for more new tokens get 400.")
    engine_num_cpus: float = Field(1.0, ge=0.0, description="CPUs Ray reserves for each engine replica.")
    engine_threads: Optional[int] = Field(None, ge=1, description="torch threads per engine replica (default: Ray's, from num_cpus).")
    engine_nice: int = Field(
        0, ge=0, le=19, description="Nice increment of each replica's engine thread (loading and decoding): the proxy and gateway carrying its tokens run first on a busy CPU."
    )
    engine_num_gpus: float = Field(0.0, ge=0.0, description="GPUs Ray reserves for each engine replica.")
    gateway_num_cpus: float = Field(0.0, ge=0.0, description="CPUs Ray reserves for the HTTP gateway.")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Where Serve runs its HTTP proxies: EveryNode (Ray's default), or HeadOnly: one proxy "
        "on the head node with the gateway beside it (one ingress address; nodes that share an IP).",
    )
    jobs: JobSettings = Field(default_factory=JobSettings, description="How specialization jobs submitted over HTTP run.")
    admin_token: Optional[str] = Field(None, min_length=8, description="Bearer token of the operator API (/v1/adapters).")
    api_key: Optional[str] = Field(None, min_length=1, description="When set, inference needs this bearer token.")
    max_upload_mb: int = Field(512, ge=1, description="Largest adapter archive accepted by POST /v1/adapters.")
    route_prefix: str = "/"

    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: Optional[str]) -> Optional[str]:
        from carve.common.database import DatabaseError, parse_url

        if value is not None:
            try:
                parse_url(value)
            except DatabaseError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _caps_agree(self) -> "ServeConfig":
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_cap ({self.max_tokens_cap})")
        return self

    @classmethod
    def from_env(cls, **values: Any) -> "ServeConfig":
        """Build a config, taking unset tokens and database from the environment."""
        from carve.common.database import DATABASE_URL_ENV  # SQLAlchemy: not imported by the CLI until needed

        values = {k: v for k, v in values.items() if v is not None}
        values.setdefault("admin_token", os.environ.get(ADMIN_TOKEN_ENV) or None)
        values.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
        values.setdefault("database_url", os.environ.get(DATABASE_URL_ENV) or None)
        return cls(**values)

    def with_generated_admin_token(self) -> "ServeConfig":
        """A copy with a fresh random operator token when none was configured (printed by `carve serve`)."""
        if self.admin_token:
            return self
        return self.model_copy(update={"admin_token": secrets.token_urlsafe(24)})

    def registry_path(self) -> Path:
        from carve.common.paths import registry_dir

        return Path(self.registry_root).expanduser() if self.registry_root else registry_dir()

    def database(self) -> str:
        """The database URL in force on this node (database_url, else CARVE_DATABASE_URL here, else the registry's SQLite file)."""
        from carve.common.database import database_url

        return database_url(self.database_url, self.registry_path())

"""How a server runs its specialization jobs: plain settings, light to import (the server's config holds them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

HEARTBEAT_S = 5.0
STALE_AFTER_S = 30.0


class JobSettings(BaseModel):
    """CPUs and GPUs each job reserves, and when a job whose runner went silent is resumed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(1.0, ge=0.0, description="CPUs Ray reserves for each job's task (one engine + training).")
    num_gpus: float = Field(0.0, ge=0.0)
    heartbeat_s: float = Field(HEARTBEAT_S, gt=0.0)
    stale_after_s: float = Field(STALE_AFTER_S, gt=0.0, description="A running job without a heartbeat this long is resumed.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job (the first and its resumptions) before it is marked failed.")

    @model_validator(mode="after")
    def _beats_before_it_goes_stale(self) -> "JobSettings":
        if self.heartbeat_s * 2 > self.stale_after_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be at most half of stale_after_s ({self.stale_after_s})")
        return self

    @classmethod
    def resuming_after(cls, stale_after_s: float, **values: float) -> "JobSettings":
        """Settings that resume a silent job after ``stale_after_s``, beating often enough for it."""
        return cls(stale_after_s=stale_after_s, heartbeat_s=min(HEARTBEAT_S, stale_after_s / 4), **values)

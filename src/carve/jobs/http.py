"""``/v1/specializations`` as plain functions: (raw body or id) -> (HTTP status, JSON body).

Kept free of FastAPI and Ray Serve so the gateway mounts each endpoint with a
few lines (see the module docstring of carve.jobs.api for the contract), and
tests call the same code without a server. Every call is blocking (database,
file writes): the gateway runs it off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

from typing import Any, Optional

from carve.jobs.api import ErrorBody, ErrorDetail, JobList, JobView
from carve.jobs.service import JobRejected, JobService, parse_request_bytes
from carve.jobs.store import JobConflict, JobNotFound

Reply = tuple[int, dict[str, Any]]


def _error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None, problems: Optional[list[str]] = None) -> Reply:
    kind = "invalid_request_error" if status < 500 else "server_error"
    detail = ErrorDetail(message=message, type=kind, param=param, code=code, problems=problems or [])
    return status, ErrorBody(error=detail).model_dump()


class JobsHttp:
    """The four endpoints over one :class:`JobService`."""

    def __init__(self, service: JobService):
        self.service = service

    def submit(self, raw: bytes) -> Reply:
        """POST /v1/specializations -> 202 JobView, or 422 with every problem."""
        try:
            job = self.service.submit(parse_request_bytes(raw))
        except JobRejected as exc:
            return _error(exc.status, str(exc), exc.param, "submission_rejected", exc.problems)
        return 202, JobView.of(job).model_dump()

    def get(self, job_id: str) -> Reply:
        """GET /v1/specializations/{id}."""
        try:
            return 200, JobView.of(self.service.get(job_id)).model_dump()
        except JobNotFound as exc:
            return _error(404, str(exc), "id", "job_not_found")

    def list(self, status: Optional[str] = None) -> Reply:
        """GET /v1/specializations[?status=...]."""
        return 200, JobList(data=[JobView.of(j) for j in self.service.list(status)]).model_dump()

    def cancel(self, job_id: str) -> Reply:
        """DELETE /v1/specializations/{id} -> the cancelled job; 409 when it already finished."""
        try:
            return 200, JobView.of(self.service.cancel(job_id)).model_dump()
        except JobNotFound as exc:
            return _error(404, str(exc), "id", "job_not_found")
        except JobConflict as exc:
            return _error(409, str(exc), "id", "job_finished")

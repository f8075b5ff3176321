"""`/v1/jobs`: recent jobs from the journal (paged), one job's state, cancel.

The journal's rows outlive the process, so a job finished before a restart is still listed (with
``journal.enabled = false`` the list is the engine's in-memory recent jobs). Prompts and answers are
shown only with ``log.content``; everything else (state, attempts, timings, usage, errors) always.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request

from edged.errors import NotFound
from edged.journal import JobRecord
from edged.transports.tcp import origin_of

if TYPE_CHECKING:
    from edged.config import Settings
    from edged.engine import Engine

MAX_PAGE = 500
MAX_SEQ = 2**63 - 1
"""The largest journal sequence number (SQLite's INTEGER); a larger ``before`` cannot be compared."""


def _prompt_of(payload: bytes) -> Any:
    """The request as received: a JSON job (its prompt or messages) or a bare text prompt."""
    if not payload:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return payload.decode("utf-8", errors="replace")
    if isinstance(data, dict):
        return data.get("messages") or data.get("prompt")
    return data


def record_document(record: JobRecord, *, content: bool) -> dict[str, Any]:
    """A journal row as `GET /v1/jobs` shows it."""
    answer = record.answer or {}
    error = (record.error or {}).get("error") if record.error else None
    doc: dict[str, Any] = {
        "seq": record.seq,
        "id": record.job_id or answer.get("id") or (record.error or {}).get("id"),
        "key": record.key,
        "origin": record.origin,
        "state": record.state.value,
        "attempts": record.attempts,
        "accepted_at": record.accepted_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "answered_at": record.answered_at,
        "response_topic": record.response_topic,
        "finish_reason": answer.get("finish_reason"),
        "usage": answer.get("usage"),
        "timings": answer.get("timings"),
        "error": error,
    }
    if content:
        doc["prompt"] = _prompt_of(record.payload)
        doc["content"] = answer.get("content")
        doc["reasoning_content"] = answer.get("reasoning_content")
    return doc


def add_job_routes(app: FastAPI, settings: Settings, engine: Engine) -> None:
    content = settings.log.content

    @app.get("/v1/jobs", summary="Recent jobs, newest first (paged with ?before=<seq>)")
    async def list_jobs(
        limit: int = Query(50, ge=1, le=MAX_PAGE, description="Jobs per page."),
        before: int | None = Query(
            None, ge=1, le=MAX_SEQ, description="The `next_before` of the previous page."
        ),
        origin: str | None = Query(
            None, max_length=200, description="Only jobs from mqtt, socket, tcp:<key>."
        ),
    ) -> dict[str, Any]:
        book = engine.book
        if book is None:
            jobs = [job.info().dump() for job in engine.jobs() if origin is None or job.origin == origin]
            jobs.reverse()
            return {"object": "list", "journal": False, "data": jobs[:limit], "next_before": None}
        records = await book.recent(limit, before=before, origin=origin)
        return {
            "object": "list",
            "journal": True,
            "data": [record_document(r, content=content) for r in records],
            "next_before": records[-1].seq if len(records) == limit else None,
        }

    @app.get("/v1/jobs/{job_id}", summary="State of a job (running, or from the journal)")
    async def get_job(request: Request, job_id: str) -> dict[str, Any]:
        owner = _scope(request)
        try:
            return engine.get(job_id, owner).info().dump()
        except NotFound:
            if engine.book is None:
                raise
        record = await engine.book.find(job_id, origin=owner)
        if record is None:
            raise NotFound(f"no job {job_id!r} (unknown, or pruned from the journal)", param="id")
        return record_document(record, content=content)

    @app.post("/v1/jobs/{job_id}/cancel", summary="Cancel a queued or running job")
    async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
        return engine.cancel(job_id, owner=_scope(request)).info().dump()


def _scope(request: Request) -> str | None:
    """Whose jobs a caller may see: a TCP key only its own (``tcp:<key name>``: another key's job is
    404, as an unknown one); the Unix socket, whose users are root or in its group, every job."""
    origin = origin_of(request)
    return origin if origin.startswith("tcp:") else None

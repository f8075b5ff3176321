"""The answer documents every transport and the journal share: a finished job's ``done`` message and
an ``error`` message (the MQTT wire shape, also what the journal stores and `GET /v1/jobs` shows),
built as `edged.wire.DoneMessage` / `edged.wire.ErrorMessage`."""

from __future__ import annotations

from typing import Any

from edged.engine.job import JobResult
from edged.errors import EdgedError
from edged.wire import DoneMessage, ErrorBody, ErrorMessage


def done_message(result: JobResult, device_id: str, *, content: bool = True) -> dict[str, Any]:
    """``content=False`` leaves the text out (what the journal keeps of a socket job without
    ``log.content``: the answer went to its client; the journal only lists the job)."""
    extra: dict[str, Any] = {}
    if result.notes:
        extra["notes"] = result.notes  # settings the backend could not apply to this job
    if result.parsed is not None and content:
        extra["parsed"] = result.parsed  # a JSON response_format: the answer, parsed and validated
    if result.tool_calls and content:
        extra["tool_calls"] = result.tool_calls  # a job with tools: the calls, validated
    return DoneMessage(
        id=result.id,
        status="done",
        content=result.content if content else None,
        reasoning_content=result.reasoning_content if content else None,
        finish_reason=result.finish_reason,
        usage=result.usage,
        timings=result.timings.model_dump(),
        model=result.model,
        device_id=device_id,
        **extra,
    ).dump()


def error_message(job_id: str | None, error: EdgedError, device_id: str) -> dict[str, Any]:
    return ErrorMessage(
        id=job_id, status="error", error=ErrorBody(**error.to_dict()["error"]), device_id=device_id
    ).dump()

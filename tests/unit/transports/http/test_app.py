"""`JobStream`, the one way a route runs a job, with a fake engine and request: the answer in the
route's API (`Wire`), the error in the route's shape, and a job cancelled when its client goes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from types import SimpleNamespace
from typing import Any

import pytest

from edged.engine import Delta, Failed, Finished, JobEvent, JobRequest, JobResult
from edged.errors import BackendError, EdgedError
from edged.transports.http import app
from edged.transports.http.app import JobStream, Wire
from unit.test_wire import result


class FakeJob:
    def __init__(self, *events: JobEvent, trimmed: int = 0) -> None:
        self.id = "job-1"
        self.prepared = SimpleNamespace(trimmed_messages=trimmed)
        self.given = list(events)
        self.finished = False
        self.hold = asyncio.Event()
        """Set to let a job without events end (it never does on its own)."""

    async def events(self) -> AsyncIterator[JobEvent]:
        for event in self.given:
            yield event
        if not self.given:
            await self.hold.wait()
        self.finished = True


class FakeEngine:
    def __init__(self, job: FakeJob) -> None:
        self.job = job
        self.submitted: list[tuple[JobRequest, str, str | None, str | None]] = []
        self.cancelled: list[tuple[FakeJob, str]] = []

    async def submit(
        self, request: JobRequest, origin: str = "", *, peer: str | None = None, family: str | None = None
    ) -> FakeJob:
        self.submitted.append((request, origin, peer, family))
        return self.job

    def cancel_job(self, job: FakeJob, reason: str) -> None:
        self.cancelled.append((job, reason))
        job.finished = True  # as the engine's: the job settles, cancelled


class FakeRequest:
    def __init__(self, path: str, gone: bool = False) -> None:
        self.scope: dict[str, Any] = {"client": ("pid=7 uid=0 gid=0", 0)}
        self.url = SimpleNamespace(path=path)
        self.gone = gone

    async def is_disconnected(self) -> bool:
        return self.gone


class Letters(Wire):
    media_type = "text/plain"
    headers = {"X-Wire": "letters"}

    def body(self, result: JobResult) -> dict[str, Any]:
        return {"content": result.content}

    def opening(self) -> Iterable[bytes]:
        return [b"<"]

    def delta(self, delta: Delta) -> Iterable[bytes]:
        return [] if delta.kind == "reasoning" else [delta.text.encode()]

    def finished(self, result: JobResult) -> Iterable[bytes]:
        return [b">"]

    def failed(self, error: EdgedError) -> Iterable[bytes]:
        return [b"!" + error.message.encode(), b">"]


def answer(job: FakeJob, request: FakeRequest, *, stream: bool) -> tuple[FakeEngine, Any, bytes]:
    engine = FakeEngine(job)

    async def run() -> tuple[Any, bytes]:
        job_stream = await JobStream.submit(engine, request, JobRequest(prompt="hi", stream=stream))
        response = await job_stream.answer(Letters())
        if not stream:
            return response, response.body
        return response, b"".join([chunk async for chunk in response.body_iterator])

    response, body = asyncio.run(run())
    return engine, response, body


def test_a_stream_is_the_wires_opening_deltas_and_end_with_the_job_id() -> None:
    job = FakeJob(
        Delta("content", "a"), Delta("reasoning", "hm"), Delta("content", "b"), Failed(BackendError("x"))
    )
    engine, response, body = answer(job, FakeRequest("/v1/completions"), stream=True)
    assert body == b"<ab!x>"
    assert response.media_type == "text/plain"
    assert response.headers["x-edged-job-id"] == "job-1" and response.headers["x-wire"] == "letters"
    assert engine.submitted[0][1:3] == ("socket", "pid=7 uid=0 gid=0"), "origin and peer from the request"
    assert engine.cancelled == [], "a job that ended is not cancelled"
    assert "x-edged-trimmed-messages" not in response.headers, "nothing was trimmed"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(("path", "family"), [("/v1/chat/completions", "openai"), ("/api/chat", "ollama")])
def test_the_routes_api_picks_the_defaults_and_a_trimmed_answer_says_so(
    path: str, family: str, stream: bool
) -> None:
    """The family of the route reaches the engine (its context_overflow default); the messages the
    engine dropped to fit are in a header, sent before the stream's first byte."""
    job = FakeJob(Finished(result(content="ok")), trimmed=6)
    engine, response, body = answer(job, FakeRequest(path), stream=stream)
    assert engine.submitted[0][3] == family
    assert response.headers["x-edged-trimmed-messages"] == "6"
    assert body == (b"<>" if stream else b'{"content":"ok"}')


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {"error": {"code": "backend_failed", "message": "x", "type": "server_error", "param": None}},
        ),
        ("/api/chat", {"error": "x"}),
    ],
)
def test_a_failed_job_is_answered_in_the_routes_error_shape(path: str, body: dict[str, Any]) -> None:
    _, response, raw = answer(FakeJob(Failed(BackendError("x"))), FakeRequest(path), stream=False)
    assert response.status_code == 500 and json.loads(raw) == body


def test_a_client_gone_before_the_answer_cancels_its_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "DISCONNECT_POLL_S", 0.01)
    job = FakeJob()
    engine, response, raw = answer(job, FakeRequest("/api/generate", gone=True), stream=False)
    assert engine.cancelled == [(job, "the client disconnected")]
    assert response.status_code == 500 and json.loads(raw) == {"error": "the job ended without a result"}

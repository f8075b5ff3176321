"""The HTTP app both listeners serve (the Unix socket as is, TCP behind its key gate): OpenAI's and
Ollama's routes (`openai.py`, `ollama.py`), /v1/jobs (`jobs.py`), health, status and metrics, and
what the routes share: the body reader, the exception handlers and `JobStream`, which runs one job
for one request and writes its answer in the request's API (`Wire`).

It only translates between HTTP and the engine's `JobRequest` / job events.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, ClassVar, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edged import __version__
from edged.config import Settings
from edged.engine import CallPiece, Delta, Engine, Failed, Finished, Job, JobEvent, JobRequest, JobResult
from edged.errors import EdgedError, InvalidRequest, NotFound, PayloadTooLarge
from edged.transports.http.errors import describe_validation, error_response, shape_of
from edged.transports.http.jobs import add_job_routes
from edged.transports.http.openapi import HealthBody, document
from edged.transports.tcp import on_tcp, origin_of, public_status

TRIMMED_HEADER = "X-Edged-Trimmed-Messages"
"""Response header of a job whose oldest messages were dropped to fit the context: how many
(``context_overflow: trim_history``; also the answer's ``timings.trimmed_messages``)."""

DISCONNECT_POLL_S = 0.25
"""How often a job's request checks that its client is still there, between events."""


# -- requests --------------------------------------------------------------------------------------

B = TypeVar("B", bound=BaseModel)


async def read_body(request: Request, model: type[B], limit: int) -> B:
    """Parse the body as JSON whatever its content type (`curl -d` says form), within ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise describe_validation(exc.errors()) from exc


def peer_of(request: Request) -> str | None:
    """Who is on the other end: ``pid=.. uid=.. gid=..`` on the Unix socket (SO_PEERCRED), the
    address on TCP."""
    client = request.scope.get("client")
    return str(client[0]) if client else None


# -- answers ---------------------------------------------------------------------------------------


class Wire(ABC):
    """How one API writes a job's answer: the whole result as one JSON body, or (a job with
    ``stream``) a stream of chunks: an opening, one per delta, then the last one or the error."""

    media_type: ClassVar[str]
    """Of the stream."""
    headers: ClassVar[dict[str, str]] = {}
    """Of the stream, beside the job's id."""

    @abstractmethod
    def body(self, result: JobResult) -> dict[str, Any]:
        """The answer of a job without ``stream``."""

    def opening(self) -> Iterable[bytes]:
        """Chunks before the first delta."""
        return ()

    @abstractmethod
    def delta(self, delta: Delta) -> Iterable[bytes]: ...

    def call_piece(self, piece: CallPiece) -> Iterable[bytes]:
        """A piece of a tool call as it is written; a wire that streams text only sends nothing (its
        answer's last chunk carries the calls, whole)."""
        return ()

    @abstractmethod
    def finished(self, result: JobResult) -> Iterable[bytes]: ...

    @abstractmethod
    def failed(self, error: EdgedError) -> Iterable[bytes]: ...


class JobStream:
    """One job for one HTTP request, as every job route runs it: submitted (`submit`), then
    answered in the request's API (`answer`: one JSON body, or chunks as they come), and cancelled
    if the client goes away before it ends (`events`)."""

    def __init__(self, engine: Engine, request: Request, job: Job, stream: bool) -> None:
        self.engine = engine
        self.request = request
        self.job = job
        self.stream = stream
        self.headers = {"X-Edged-Job-Id": job.id}
        if job.prepared.trimmed_messages:  # known before the first byte: the prompt was fitted at submit
            self.headers[TRIMMED_HEADER] = str(job.prepared.trimmed_messages)

    @classmethod
    async def submit(cls, engine: Engine, request: Request, job_request: JobRequest) -> JobStream:
        """Queue the job, from this request's listener and peer, with the defaults of the route's
        API (Ollama's under ``/api/``, OpenAI's elsewhere); raises the engine's `EdgedError`."""
        job = await engine.submit(
            job_request,
            origin=origin_of(request),
            peer=peer_of(request),
            family=shape_of(request.url.path),
        )
        return cls(engine, request, job, job_request.stream)

    async def answer(self, wire: Wire) -> Response:
        """The job's answer: the result's body, or its error in the route's shape; with ``stream``
        the chunks as the job makes them."""
        if self.stream:
            headers = {**self.headers, **wire.headers}
            return StreamingResponse(self._chunks(wire), media_type=wire.media_type, headers=headers)
        outcome: JobEvent | None = None
        async for event in self.events():
            outcome = event
        if isinstance(outcome, Finished):
            return JSONResponse(wire.body(outcome.result), headers=self.headers)
        error = outcome.error if isinstance(outcome, Failed) else EdgedError("the job ended without a result")
        return error_response(error, shape_of(self.request.url.path))

    async def _chunks(self, wire: Wire) -> AsyncIterator[bytes]:
        for chunk in wire.opening():
            yield chunk
        async for event in self.events():
            if isinstance(event, Delta):
                chunks = wire.delta(event)
            elif isinstance(event, CallPiece):
                chunks = wire.call_piece(event)
            elif isinstance(event, Finished):
                chunks = wire.finished(event.result)
            else:
                chunks = wire.failed(event.error)
            for chunk in chunks:
                yield chunk

    async def events(self) -> AsyncIterator[JobEvent]:
        """The job's events (deltas when streaming, then one `Finished` or `Failed`); if the client
        goes away first, the job is cancelled and the events end."""
        job, engine = self.job, self.engine
        events = job.events().__aiter__()
        pending: asyncio.Task[JobEvent] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(events.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
                if not done:
                    if await self.request.is_disconnected():
                        engine.cancel_job(job, "the client disconnected")
                        return
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield event
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
            if not job.finished:
                engine.cancel_job(job, "the client disconnected")


# -- the app ---------------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    engine: Engine,
    status: Callable[[], dict[str, Any]],
    metrics: Callable[[], bytes] | None = None,
) -> FastAPI:
    """The socket API. ``status`` builds the /status document, ``metrics`` the Prometheus exposition."""
    # imported here, not above: the two APIs' routes import read_body, JobStream and Wire from this module
    from edged.transports.http import ollama, openai

    app = FastAPI(
        title="edged",
        version=__version__,
        description="LLM inference on a small board: OpenAI-compatible API on a local Unix socket.",
        redirect_slashes=False,  # /v1/jobs/ is an unknown route (404 not_found), not a redirect
    )

    @app.exception_handler(EdgedError)
    async def _edged_error(request: Request, exc: EdgedError) -> JSONResponse:
        return error_response(exc, shape_of(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(describe_validation(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}"))
        error = InvalidRequest(f"{request.method} {request.url.path}: {exc.detail}")
        # 405 keeps its Allow header (RFC 9110): which methods the route does take
        return JSONResponse(error.to_dict(), status_code=exc.status_code, headers=exc.headers)

    openai.add_openai_routes(app, settings, engine)

    @app.get(
        "/health",
        summary="200 when ready for jobs, 503 while loading or failed",
        responses={
            200: {"model": HealthBody},
            503: {
                "model": HealthBody,
                "description": "Loading, or failed to load",
                "headers": {"Retry-After": {"required": True, "schema": {"type": "string"}}},
            },
        },
    )
    async def health() -> JSONResponse:
        snap = engine.snapshot()
        if snap.ready:
            return JSONResponse({"status": "ok"})
        body: dict[str, Any] = {"status": snap.state.value}
        if snap.load_error:
            body["error"] = snap.load_error
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})

    @app.get("/status", summary="Board, profile, backend and why, model, queue, throughput")
    async def get_status(request: Request) -> dict[str, Any]:
        """The full document on the socket; on TCP a reduced one (`public_status`)."""
        return public_status(status()) if on_tcp(request) else status()

    @app.get(
        "/metrics",
        summary="Prometheus metrics (edged_*)",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def get_metrics() -> Response:
        if metrics is None:
            raise NotFound("metrics are not enabled")
        return Response(metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    add_job_routes(app, settings, engine)
    ollama.add_ollama_routes(app, settings, engine)
    document(app, (*openai.BODIES, *ollama.BODIES), settings.jobs.max_timeout_s)
    return app

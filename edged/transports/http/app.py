"""The HTTP app both listeners serve (the Unix socket as is, TCP behind its key gate): OpenAI's and
Ollama's routes, /v1/jobs, health, status and metrics, and what they share: the body reader and the
exception handlers.

It only translates between HTTP and the engine's `JobRequest` / job events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edged import __version__
from edged.config import Settings
from edged.engine import Delta, Engine, Failed, Finished, Job, JobRequest, JobResult
from edged.errors import EdgedError, InvalidRequest, NotFound, PayloadTooLarge
from edged.transports.http.errors import describe_validation, error_response
from edged.transports.http.jobs import add_job_routes
from edged.transports.http.ollama import BODIES as OLLAMA_BODIES
from edged.transports.http.ollama import add_ollama_routes
from edged.transports.http.openai import BODIES as OPENAI_BODIES
from edged.transports.http.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    _chat_body,
    _completion_body,
    _sse,
)
from edged.transports.http.openapi import HealthBody, body_ref, document
from edged.transports.tcp import on_tcp, origin_of, peer_of, public_status

log = structlog.get_logger(__name__)

DISCONNECT_POLL_S = 0.25


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


async def events_while_connected(job: Job, request: Request, engine: Engine) -> AsyncIterator[Any]:
    """The job's events; if the client goes away first, the job is cancelled."""
    events = job.events().__aiter__()
    pending: asyncio.Task[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if not done:
                if await request.is_disconnected():
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


def create_app(
    settings: Settings,
    engine: Engine,
    status: Callable[[], dict[str, Any]],
    metrics: Callable[[], bytes] | None = None,
) -> FastAPI:
    """The socket API. ``status`` builds the /status document, ``metrics`` the Prometheus exposition."""
    app = FastAPI(
        title="edged",
        version=__version__,
        description="LLM inference on a small board: OpenAI-compatible API on a local Unix socket.",
        redirect_slashes=False,  # /v1/jobs/ is an unknown route (404 not_found), not a redirect
    )

    @app.exception_handler(EdgedError)
    async def _edged_error(_: Request, exc: EdgedError) -> JSONResponse:
        return error_response(exc)

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

    async def run(
        job_request: JobRequest,
        request: Request,
        shape: Callable[[JobResult], dict[str, Any]],
        chunk_object: str,
    ) -> Any:
        job = await engine.submit(job_request, origin=origin_of(request), peer=peer_of(request))
        headers = {"X-Edged-Job-Id": job.id}
        if not job_request.stream:
            async for event in events_while_connected(job, request, engine):
                if isinstance(event, Finished):
                    return JSONResponse(shape(event.result), headers=headers)
                if isinstance(event, Failed):
                    return error_response(event.error)
            return error_response(EdgedError("the job ended without a result"))
        return StreamingResponse(
            _stream(job, request, chunk_object),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache"},
        )

    async def _stream(job: Job, request: Request, chunk_object: str) -> AsyncIterator[bytes]:
        base = {
            "id": job.id,
            "object": chunk_object,
            "created": job.created,
            "model": engine.snapshot().model,
        }
        chat = chunk_object == "chat.completion.chunk"

        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            if chat:
                return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return {
                **base,
                "choices": [
                    {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
                ],
            }

        if chat:
            yield _sse(choice({"role": "assistant", "content": ""}))
        async for event in events_while_connected(job, request, engine):
            if isinstance(event, Delta):
                key = "reasoning_content" if event.kind == "reasoning" else "content"
                if not chat and key != "content":
                    continue
                yield _sse(choice({key: event.text}))
            elif isinstance(event, Finished):
                last = choice({}, event.result.finish_reason)
                last["usage"] = event.result.usage.model_dump()
                last["timings"] = event.result.timings.model_dump()
                if event.result.notes:
                    last["notes"] = event.result.notes
                yield _sse(last)
                yield _sse("[DONE]")
            elif isinstance(event, Failed):
                yield _sse(event.error.to_dict())

    limit = settings.jobs.max_payload_bytes

    @app.post(
        "/v1/chat/completions",
        summary="Chat completion (OpenAI-compatible), streamed with SSE",
        openapi_extra=body_ref(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Any:
        job_request = (await read_body(request, ChatCompletionRequest, limit)).to_job()
        if job_request.raw:
            raise InvalidRequest("'raw' prompts go to /v1/completions", param="raw")
        return await run(job_request, request, _chat_body, "chat.completion.chunk")

    @app.post(
        "/v1/completions",
        summary="Raw text completion (OpenAI-compatible), streamed with SSE",
        openapi_extra=body_ref(CompletionRequest),
    )
    async def completions(request: Request) -> Any:
        body = await read_body(request, CompletionRequest, limit)
        return await run(body.to_job(), request, _completion_body, "text_completion")

    @app.get("/v1/models", summary="The loaded model")
    async def models(request: Request) -> dict[str, Any]:
        path = settings.model.path
        snap = engine.snapshot()
        meta: dict[str, Any] = {
            "n_ctx": snap.n_ctx,
            "backend": snap.backend,
            "path": str(path) if path else None,
            "state": snap.state.value,
            "slots": snap.slots.total,
        }
        if on_tcp(request):
            del meta["path"]  # where the board keeps its files is the socket's business only
        return {
            "object": "list",
            "data": [
                {
                    "id": snap.model,
                    "object": "model",
                    "created": int(snap.started_wall),
                    "owned_by": "edged",
                    "meta": meta,
                }
            ],
        }

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
    add_ollama_routes(app, settings, engine, read_body, events_while_connected)
    document(app, (*OPENAI_BODIES, *OLLAMA_BODIES), settings.jobs.max_timeout_s)
    return app

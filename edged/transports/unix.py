"""HTTP/1.1 over the local Unix socket: an OpenAI-compatible API plus health, status and cancel.

This module only translates between HTTP and the engine's `JobRequest` / job events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from edged import __version__
from edged.config import Settings
from edged.engine import Delta, Engine, Failed, Finished, Job, JobRequest, JobResult
from edged.engine.job import JsonInt, OptionalJsonInt, job_schema_rules
from edged.errors import (
    EdgedError,
    InvalidRequest,
    NotFound,
    NotSupported,
    PayloadTooLarge,
    TransportError,
    error_codes,
)
from edged.transports.http.errors import error_response
from edged.transports.http.jobs import add_job_routes
from edged.transports.http.ollama import BODIES as OLLAMA_BODIES
from edged.transports.http.ollama import add_ollama_routes, tool_result
from edged.transports.limits import SOCKET_LIMITS, LimitedH11Protocol, ListenerLimits, ServerConfig
from edged.transports.tcp import on_tcp, origin_of, peer_of, public_status

log = structlog.get_logger(__name__)

DISCONNECT_POLL_S = 0.25


# -- the socket ------------------------------------------------------------------------------------


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """Bind and listen on ``path`` with ``mode``; replace a stale file, refuse if edged is live there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise TransportError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            log.info("replacing stale socket", path=str(path))
            path.unlink()
        else:
            raise TransportError(f"another process is already listening on {path} (is edged running?)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


class PeerCredProtocol(LimitedH11Protocol):
    """The HTTP protocol of both listeners (its limits: `edged.transports.limits`), plus who is on
    the other end of a Unix socket connection: the peer's pid, uid and gid from the kernel
    (SO_PEERCRED) as the request's ``client`` host, so each job's log line says which local process
    sent it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return
        pid, uid, gid = struct.unpack("3i", creds)
        self.client = (f"pid={pid} uid={uid} gid={gid}", 0)


class UnixServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon decides how shutdown proceeds."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(
    app: ASGIApp, *, limits: ListenerLimits = SOCKET_LIMITS, ssl_context: ssl.SSLContext | None = None
) -> UnixServer:
    """A uvicorn server for ``app`` with a listener's connection limits (the Unix socket's unless
    told; the TCP listener's options, TLS included: `edged.transports.tcp.listener_options`)."""
    config = ServerConfig(
        app,
        limits=limits,
        ssl_context=ssl_context,
        http=PeerCredProtocol,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    return UnixServer(config)


# -- request bodies --------------------------------------------------------------------------------


class OpenAIMessage(BaseModel):
    """A message as OpenAI's clients send it; turned into edged's plain text messages."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="developer counts as system; tool and function results are told to the model as text."
    )
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or content parts of which edged reads the text ones."
    )
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None

    def to_message(self, index: int) -> dict[str, Any]:
        where = f"messages[{index}].content"
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    raise NotSupported(
                        f"{where}: '{kind}' parts are not supported: the model on this board reads text",
                        param=where,
                    )
            text = "\n".join(texts)
        else:
            text = self.content or ""
        if self.role == "developer":
            return {"role": "system", "content": text}
        if self.role in ("tool", "function"):
            return tool_result(self.name, text)
        message: dict[str, Any] = {"role": self.role, "content": text}
        if self.name:
            message["name"] = self.name
        return message


def _chat_rules(schema: dict[str, Any]) -> None:
    job_schema_rules(schema)
    schema["properties"]["raw"]["const"] = False  # raw prompts go to /v1/completions


def _completion_rules(schema: dict[str, Any]) -> None:
    job_schema_rules(schema)
    schema["allOf"].append(
        {"required": ["prompt"], "properties": {"prompt": {"type": "string", "minLength": 1}}}
    )


class ChatCompletionRequest(JobRequest):
    """OpenAI ``/v1/chat/completions`` body: every documented field is accepted; edged applies what
    it supports, ignores what cannot change the answer and refuses the rest with ``not_supported``
    naming the field. Fields OpenAI does not define are ``invalid_request``."""

    model_config = ConfigDict(json_schema_extra=_chat_rules)

    messages: list[OpenAIMessage] | None = Field(None, min_length=1, description="Chat messages.")  # type: ignore[assignment]
    max_completion_tokens: OptionalJsonInt = Field(
        None, ge=1, description="OpenAI's newer name for max_tokens."
    )
    n: JsonInt = Field(1, ge=1, description="Number of choices; edged generates one (n > 1: not_supported).")
    stream_options: dict[str, Any] | None = Field(None, description="Accepted; usage is always sent.")
    user: str | None = Field(None, description="Accepted and ignored.")
    tools: list[dict[str, Any]] | None = Field(
        None,
        description="Accepted: with tool_choice absent, 'auto' or 'none' the model answers in text (no "
        "tool calls); a forced tool_choice is not_supported.",
    )
    tool_choice: str | dict[str, Any] | None = Field(None, description="none/auto: text answers.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tool calls).")
    functions: list[dict[str, Any]] | None = Field(None, description="Deprecated tools; as tools.")
    function_call: str | dict[str, Any] | None = Field(None, description="Deprecated tool_choice.")
    logprobs: bool | None = Field(None, description="true: not_supported.")
    top_logprobs: OptionalJsonInt = Field(None, ge=0, le=20, description="With logprobs: not_supported.")
    metadata: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Accepted and ignored (edged stores no completions).")
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(None, description="Accepted and ignored (edged caches prefixes).")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    prediction: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    verbosity: str | None = Field(None, description="Accepted and ignored.")
    modalities: list[str] | None = Field(None, description="['text'] only.")
    audio: dict[str, Any] | None = Field(None, description="Audio output: not_supported.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="none or minimal: think=false (no reasoning); others: the model's default."
    )
    web_search_options: dict[str, Any] | None = Field(None, description="not_supported.")

    def _refuse_unsupported(self) -> None:
        if self.n > 1:
            raise NotSupported("n: edged generates one choice per request", param="n")
        if self.logprobs or self.top_logprobs:
            raise NotSupported("logprobs: edged does not return token log-probabilities", param="logprobs")
        choice = self.tool_choice if self.tool_choice is not None else self.function_call
        if choice not in (None, "auto", "none"):
            raise NotSupported(
                "tool_choice: edged does not make tool calls; with tool_choice 'auto' or 'none' the model "
                "answers in text",
                param="tool_choice",
            )
        if self.modalities and set(self.modalities) != {"text"}:
            raise NotSupported("modalities: edged answers in text only", param="modalities")
        if self.audio is not None:
            raise NotSupported("audio: edged answers in text only", param="audio")
        if self.web_search_options is not None:
            raise NotSupported("web_search_options: edged has no web search", param="web_search_options")

    def to_job(self) -> JobRequest:
        self._refuse_unsupported()
        own = set(JobRequest.model_fields)
        data = self.model_dump(include=own - {"messages"}, exclude_unset=True)
        if self.messages is not None:
            data["messages"] = [m.to_message(i) for i, m in enumerate(self.messages)]
        if self.max_completion_tokens and not self.max_tokens:
            data["max_tokens"] = self.max_completion_tokens
        if self.reasoning_effort in ("none", "minimal") and self.think is None and not self.raw:
            data["think"] = False
        if self.tools or self.functions:
            log.debug("tools accepted, answering in text", tools=len(self.tools or self.functions or []))
        try:
            return JobRequest.model_validate(data)
        except ValidationError as exc:  # e.g. reasoning_effort "none" (think: false) with raw
            raise _describe_validation(exc.errors()) from exc


class CompletionRequest(ChatCompletionRequest):
    """OpenAI ``/v1/completions`` body: ``prompt`` is fed to the model as is."""

    model_config = ConfigDict(json_schema_extra=_completion_rules)

    def to_job(self) -> JobRequest:
        job = super().to_job()
        if not job.prompt:  # raw text: an empty prompt has no token to continue from
            raise InvalidRequest(
                "/v1/completions needs a non-empty 'prompt' (use /v1/chat/completions for messages)",
                param="prompt",
            )
        return job.model_copy(update={"raw": True})


# -- limits and errors -----------------------------------------------------------------------------


def _describe_validation(errors: list[Any]) -> InvalidRequest:
    problems = []
    param = None
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return InvalidRequest(f"malformed JSON: {ctx.get('error', err.get('msg'))}")
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        param = param or where
        problems.append(f"{where}: {err.get('msg')}")
    return InvalidRequest("invalid request: " + "; ".join(problems), param=param)


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
        raise _describe_validation(exc.errors()) from exc


def _body_ref(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the handler parses itself, pointing at a schema `_document` adds."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


# -- /openapi.json: bodies, errors, streams ------------------------------------------------------------


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(
        description="The stable code; its HTTP status is the contract's.",
        json_schema_extra={"enum": list[Any](error_codes())},  # edged.errors' classes are the list
    )
    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description="OpenAI's error type.")
    param: str | None = Field(description="The request field at fault, if one is.")


class ErrorBody(BaseModel):
    """An error answer (OpenAI's shape); a code may bring details (n_prompt_tokens, n_ctx, ...)."""

    error: ErrorDetail


class OllamaErrorBody(BaseModel):
    """An error answer of the Ollama routes, in Ollama's shape; the HTTP status is edged's code's."""

    error: str


class HealthBody(BaseModel):
    status: str = Field(description="ok when ready; else the engine's state (loading, failed, ...).")
    error: str | None = Field(None, description="Why the model could not be loaded.")


_ERROR_STATUSES = {
    400: "invalid_request (malformed JSON, wrong types, unknown fields), context_length_exceeded",
    404: "not_found, model_not_found",
    413: "payload_too_large",
    422: "invalid_output: a JSON answer cut short by max_tokens or the deadline",
    499: "cancelled",
    500: "backend_failed",
    501: "not_supported",
    503: "queue_full, not_ready, storage_unavailable (Retry-After)",
    504: "deadline_exceeded",
}
_JOB_ERRORS = (400, 404, 413, 422, 499, 500, 501, 503, 504)
_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/chat/completions"): _JOB_ERRORS,
    ("post", "/v1/completions"): _JOB_ERRORS,
    ("get", "/metrics"): (404,),
    ("get", "/v1/jobs"): (400, 503),
    ("get", "/v1/jobs/{job_id}"): (404, 503),
    ("post", "/v1/jobs/{job_id}/cancel"): (404,),
    ("post", "/api/show"): (400, 404, 413),
    ("post", "/api/chat"): _JOB_ERRORS,
    ("post", "/api/generate"): _JOB_ERRORS,
}
"""The errors each operation can answer (the TCP listener adds 401 and 429 to all but /health)."""
_STREAMS = {
    "/v1/chat/completions": "text/event-stream",
    "/v1/completions": "text/event-stream",
    "/api/chat": "application/x-ndjson",
    "/api/generate": "application/x-ndjson",
}
"""The 200 answer of a job with ``stream``: server-sent events, or Ollama's JSON lines."""
_STREAM_ITEM: dict[str, dict[str, Any]] = {
    "text/event-stream": {  # one event (OpenAPI 3.1: the schema of a stream's media type is per event)
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "description": "A chunk as JSON, then the last chunk (finish_reason, usage, timings) "
                'and [DONE]; or, instead of the rest, an error as JSON ({"error": {code, ...}}).',
            }
        },
    },
    "application/x-ndjson": {
        "type": "object",
        "description": "One JSON line: a chunk, the last (done) or an error.",
    },
}


def _error_doc(status: int, body: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "description": _ERROR_STATUSES[status],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
    }
    if status == 503:
        retry = {"description": "Seconds to wait before trying again.", "schema": {"type": "string"}}
        doc["headers"] = {"Retry-After": {**retry, "required": True}}
    return doc


def _document(app: FastAPI, models: tuple[type[BaseModel], ...], max_timeout_s: float) -> None:
    """Complete /openapi.json: the self-parsed request bodies in its components (with this daemon's
    jobs.max_timeout_s), each operation's error answers (400, not FastAPI's 422, for a bad
    parameter), and the streamed 200 answers."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            documented: tuple[type[BaseModel], ...] = (*models, ErrorBody, OllamaErrorBody)
            for model in documented:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
                if "timeout_s" in js["properties"]:
                    js["properties"]["timeout_s"]["anyOf"][0]["maximum"] = max_timeout_s
            for path, operations in schema["paths"].items():
                for method, operation in operations.items():
                    responses = operation["responses"]
                    responses.pop("422", None)  # validation errors are answered 400 invalid_request
                    body = (
                        "OllamaErrorBody"
                        if path in ("/api/show", "/api/chat", "/api/generate")
                        else "ErrorBody"
                    )
                    for status in _ERRORS.get((method, path), ()):
                        responses[str(status)] = _error_doc(status, body)
                    if path in _STREAMS:
                        responses["200"]["content"][_STREAMS[path]] = {"schema": _STREAM_ITEM[_STREAMS[path]]}
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# -- the app ---------------------------------------------------------------------------------------


def _chat_body(result: JobResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.reasoning_content is not None:
        message["reasoning_content"] = result.reasoning_content
    return {
        "id": result.id,
        "object": "chat.completion",
        "created": result.created,
        "model": result.model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason}],
        "usage": result.usage.model_dump(),
        "timings": result.timings.model_dump(),
        **({"notes": result.notes} if result.notes else {}),
    }


def _completion_body(result: JobResult) -> dict[str, Any]:
    return {
        "id": result.id,
        "object": "text_completion",
        "created": result.created,
        "model": result.model,
        "choices": [
            {"index": 0, "text": result.content, "logprobs": None, "finish_reason": result.finish_reason}
        ],
        "usage": result.usage.model_dump(),
        "timings": result.timings.model_dump(),
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


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
        return error_response(_describe_validation(list(exc.errors())))

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
        openapi_extra=_body_ref(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Any:
        job_request = (await read_body(request, ChatCompletionRequest, limit)).to_job()
        if job_request.raw:
            raise InvalidRequest("'raw' prompts go to /v1/completions", param="raw")
        return await run(job_request, request, _chat_body, "chat.completion.chunk")

    @app.post(
        "/v1/completions",
        summary="Raw text completion (OpenAI-compatible), streamed with SSE",
        openapi_extra=_body_ref(CompletionRequest),
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
    _document(app, (ChatCompletionRequest, CompletionRequest, *OLLAMA_BODIES), settings.jobs.max_timeout_s)
    return app


def unlink_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()

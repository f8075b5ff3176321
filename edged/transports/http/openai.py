"""OpenAI's API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``): its request bodies
translated into the engine's one `JobRequest`, and its answers (a completion object, or server-sent
chunks) shaped from the job's result."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cached_property
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edged.config import Settings
from edged.engine import CallPiece, Delta, Engine, Job, JobRequest, JobResult
from edged.engine.job import TOOL_SCHEMA, JsonInt, OptionalJsonInt, job_schema_rules
from edged.errors import EdgedError, InvalidRequest, NotSupported
from edged.tools.spec import parse_choice, parse_tools
from edged.transports.http.app import JobStream, Wire, read_body
from edged.transports.http.errors import describe_validation
from edged.transports.http.openapi import body_ref
from edged.transports.tcp import on_tcp

# -- request bodies --------------------------------------------------------------------------------


class OpenAIFunction(BaseModel):
    """An earlier call's function as OpenAI's clients send it (unknown keys ignored)."""

    name: str
    arguments: str | dict[str, Any] = "{}"


class OpenAIToolCall(BaseModel):
    """An earlier call as OpenAI's clients send it (unknown keys, such as a stream's ``index``, ignored)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: OpenAIFunction


class OpenAIMessage(BaseModel):
    """A message as OpenAI's clients send it; turned into edged's plain text messages."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="developer counts as system; function (deprecated) as tool."
    )
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or content parts of which edged reads the text ones."
    )
    name: str | None = None
    tool_calls: list[OpenAIToolCall] | None = None
    tool_call_id: str | None = None
    function_call: OpenAIFunction | None = None
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
        if self.role in ("tool", "function"):  # a result, rendered in the model's own tool format
            result: dict[str, Any] = {"role": "tool", "content": text}
            if self.tool_call_id is not None:
                result["tool_call_id"] = self.tool_call_id
            if self.name:
                result["name"] = self.name
            return result
        message: dict[str, Any] = {"role": self.role, "content": text}
        if self.name:
            message["name"] = self.name
        calls = self.tool_calls
        if calls is None and self.function_call is not None:
            calls = [OpenAIToolCall(function=self.function_call)]
        if self.role == "assistant" and calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in calls]
        return message


def _legacy_tool_rules(schema: dict[str, Any]) -> None:
    """The shapes of OpenAI's deprecated ``functions`` and ``function_call``, as `JobRequest`'s own
    rules give ``tools`` and ``tool_choice`` theirs."""
    props = schema["properties"]
    props["functions"]["anyOf"][0] = {"type": "array", "items": TOOL_SCHEMA["properties"]["function"]}
    props["function_call"]["anyOf"][:2] = [
        {"enum": ["none", "auto"]},
        {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
    ]


def _chat_rules(schema: dict[str, Any]) -> None:
    job_schema_rules(schema)
    _legacy_tool_rules(schema)
    schema["properties"]["raw"]["const"] = False  # raw prompts go to /v1/completions


def _completion_rules(schema: dict[str, Any]) -> None:
    job_schema_rules(schema)
    _legacy_tool_rules(schema)
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
        if self.modalities and set(self.modalities) != {"text"}:
            raise NotSupported("modalities: edged answers in text only", param="modalities")
        if self.audio is not None:
            raise NotSupported("audio: edged answers in text only", param="audio")
        if self.web_search_options is not None:
            raise NotSupported("web_search_options: edged has no web search", param="web_search_options")

    def _check_tools(self) -> None:
        """As the job's, with OpenAI's deprecated ``functions`` and ``function_call`` (errors name them)."""
        specs = parse_tools(self.tools, self.functions)
        self._set_tools(specs, parse_choice(specs, self.tool_choice, self.function_call))

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
        if self.functions is not None:  # deprecated: the same functions as tools
            data["tools"] = [{"type": "function", "function": f} for f in self.functions]
        if isinstance(self.function_call, dict):
            data["tool_choice"] = {"type": "function", "function": {"name": self.function_call.get("name")}}
        elif self.function_call is not None:
            data["tool_choice"] = self.function_call
        try:
            return JobRequest.model_validate(data)
        except ValidationError as exc:  # e.g. reasoning_effort "none" (think: false) with raw
            raise describe_validation(exc.errors()) from exc


class CompletionRequest(ChatCompletionRequest):
    """OpenAI ``/v1/completions`` body: ``prompt`` is fed to the model as is."""

    model_config = ConfigDict(json_schema_extra=_completion_rules)

    def to_job(self) -> JobRequest:
        job = super().to_job()
        if job.uses_tools:
            raise InvalidRequest("tools need chat messages: use /v1/chat/completions", param="tools")
        if not job.prompt:  # raw text: an empty prompt has no token to continue from
            raise InvalidRequest(
                "/v1/completions needs a non-empty 'prompt' (use /v1/chat/completions for messages)",
                param="prompt",
            )
        return job.model_copy(update={"raw": True})


BODIES: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest)
"""The request bodies the routes parse themselves; the app adds them to /openapi.json's components."""


# -- answers ---------------------------------------------------------------------------------------


class ChatAnswer(Wire):
    """A chat job's answer: a ``chat.completion``, or ``chat.completion.chunk`` events that open with
    the assistant's role and end with the usage and timings, then ``[DONE]``."""

    media_type = "text/event-stream"
    headers = {"Cache-Control": "no-cache"}
    chunk_object = "chat.completion.chunk"

    def __init__(self, job: Job, engine: Engine) -> None:
        self.job = job
        self.engine = engine

    @cached_property
    def _base(self) -> dict[str, Any]:
        """What every chunk of the stream repeats (taken when the stream starts)."""
        job = self.job
        return {
            "id": job.id,
            "object": self.chunk_object,
            "created": job.created,
            "model": self.engine.snapshot().model,
        }

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def body(self, result: JobResult) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.content}
        if result.reasoning_content is not None:
            message["reasoning_content"] = result.reasoning_content
        if result.tool_calls:  # OpenAI: content null beside calls, unless the model also wrote text
            message["content"] = result.content or None
            message["tool_calls"] = result.tool_calls
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

    def opening(self) -> Iterable[bytes]:
        return [_sse(self._chunk({"role": "assistant", "content": ""}))]

    def delta(self, delta: Delta) -> Iterable[bytes]:
        key = "reasoning_content" if delta.kind == "reasoning" else "content"
        return [_sse(self._chunk({key: delta.text}))]

    def call_piece(self, piece: CallPiece) -> Iterable[bytes]:
        """A piece of a call as llama-server streams it: the first of a call with its ``index``,
        ``id``, ``type`` and name, the next ones with ``function.arguments`` text only. The calls are
        validated when the answer is complete: one that is not ends the stream with the error."""
        return [_sse(self._chunk({"tool_calls": [piece.call.to_openai()]}))]

    def finished(self, result: JobResult) -> Iterable[bytes]:
        """The last chunk (its ``finish_reason``; the calls came in pieces before it), ``[DONE]``."""
        last = self._chunk({}, result.finish_reason)
        last["usage"] = result.usage.model_dump()
        last["timings"] = result.timings.model_dump()
        if result.notes:
            last["notes"] = result.notes
        return [_sse(last), _sse("[DONE]")]

    def failed(self, error: EdgedError) -> Iterable[bytes]:
        return [_sse(error.to_dict())]


class CompletionAnswer(ChatAnswer):
    """A raw completion's answer: a ``text_completion``, or chunks of the same object (the text
    only: reasoning is not sent) that end as a chat's do."""

    chunk_object = "text_completion"

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        return {**self._base, "choices": [choice]}

    def body(self, result: JobResult) -> dict[str, Any]:
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

    def opening(self) -> Iterable[bytes]:
        return ()

    def delta(self, delta: Delta) -> Iterable[bytes]:
        return () if delta.kind == "reasoning" else super().delta(delta)


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


# -- routes ----------------------------------------------------------------------------------------


def add_openai_routes(app: FastAPI, settings: Settings, engine: Engine) -> None:
    """Register OpenAI's routes on ``app`` (the same app serves the socket and the TCP listener)."""
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
        stream = await JobStream.submit(engine, request, job_request)
        return await stream.answer(ChatAnswer(stream.job, engine))

    @app.post(
        "/v1/completions",
        summary="Raw text completion (OpenAI-compatible), streamed with SSE",
        openapi_extra=body_ref(CompletionRequest),
    )
    async def completions(request: Request) -> Any:
        body = await read_body(request, CompletionRequest, limit)
        stream = await JobStream.submit(engine, request, body.to_job())
        return await stream.answer(CompletionAnswer(stream.job, engine))

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

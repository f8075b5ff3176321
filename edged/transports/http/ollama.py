"""Ollama-compatible routes (``/api/*``), for Home Assistant, Open WebUI and the ``ollama`` clients.

A translation layer only: each request becomes the engine's one `JobRequest`, each answer Ollama's
NDJSON stream or object (field names, durations in nanoseconds), run by the app's `JobStream`. The
`EdgedError`s these routes raise reach the app's handler, which answers them in Ollama's
``{"error": "..."}`` shape (`errors.shape_of`). What edged cannot do (pull, push, create, copy,
delete, embeddings) answers 501 with the reason.

Tools (``/api/chat``) as Ollama has them: ``tools`` in OpenAI's shape, always ``auto`` (Ollama has no
``tool_choice``); earlier calls come back with their arguments as objects and results as ``role:
"tool"`` messages naming the tool (``tool_name``) or the call (``tool_call_id``, Ollama 0.12.10 on),
which the job renders in the model's own tool format. The calls go out as Ollama writes them
(`ollama_calls`), with ``done_reason: "stop"``.
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Literal

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edged.config import Settings
from edged.engine import Delta, Engine, JobRequest, JobResult
from edged.engine.job import JsonInt, OptionalJsonInt
from edged.engine.snapshot import ModelFacts
from edged.errors import EdgedError, InvalidRequest, ModelNotFound, NotSupported
from edged.transports.http.app import JobStream, Wire, read_body
from edged.transports.http.openapi import body_ref

log = structlog.get_logger(__name__)

OLLAMA_API_VERSION = "0.12.6"
"""The Ollama release whose API these routes follow (clients compare it to feature minimums)."""

SUPPORTED_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "num_predict": "max_tokens",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "stop": "stop",
}
"""Ollama options edged applies per job, and the job field each one sets."""

RUNTIME_OPTIONS = {
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "num_keep",
    "use_mmap",
    "use_mlock",
    "numa",
    "low_vram",
    "vocab_only",
    "f16_kv",
    "logits_all",
    "embedding_only",
    "repeat_last_n",
    "typical_p",
    "tfs_z",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "penalize_newline",
}
"""Options that configure Ollama's runner or samplers edged does not have: accepted and ignored (as
Ollama itself ignores options it does not know); the daemon's configuration decides these."""


class OllamaCalledFunction(BaseModel):
    """An earlier call's function as Ollama's clients send it back: the arguments an object (null
    is none, as in Ollama; a JSON object's text is taken too); ``index`` (newer clients) is the
    call's place in its message."""

    model_config = ConfigDict(extra="ignore", strict=True)

    index: OptionalJsonInt = None
    name: str
    arguments: dict[str, Any] | str | None = None


class OllamaToolCall(BaseModel):
    """An earlier call (``message.tool_calls[]``); ``id`` since Ollama 0.12.10."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str | None = None
    function: OllamaCalledFunction


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    """Null is empty, as in Ollama (clients send it beside an assistant's calls)."""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        """Ollama reads roles in any case (``"User"``)."""
        return value.lower() if isinstance(value, str) else value


class _Common(BaseModel):
    # Ollama ignores fields it does not know, so do these routes; a known field of the wrong type is an
    # error (as in Ollama), not coerced
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | int | float | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: OptionalJsonInt = None

    def refuse_unsupported(self) -> None:
        if self.logprobs or self.top_logprobs:
            raise NotSupported("logprobs: edged does not return token log-probabilities", param="logprobs")


class ChatRequest(_Common):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Common):
    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    images: list[str] | None = None
    template: str | None = None
    context: list[JsonInt] | None = None
    raw: bool = False


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    name: str | None = None  # older clients
    verbose: bool = False


BODIES: tuple[type[BaseModel], ...] = (ShowRequest, ChatRequest, GenerateRequest)
"""The request bodies the routes parse themselves; the app adds them to /openapi.json's components."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(ms: float | None) -> int:
    return int((ms or 0.0) * 1e6)


def model_tag(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _local_name(requested: str, loaded: str) -> str:
    """Ollama names carry a tag (``name:latest``); edged's model has none."""
    if requested in (loaded, model_tag(loaded)):
        return loaded
    raise ModelNotFound(f"model '{requested}' not found (this board serves '{model_tag(loaded)}')")


MAX_OPTIONS = 256
"""Keys an ``options`` object may have (Ollama defines about 40); more is refused, not walked."""
UNKNOWN_OPTIONS_NAMED = 5
"""Unknown option names the one log line about them quotes (each cut to 40 characters)."""


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    if options and len(options) > MAX_OPTIONS:
        raise InvalidRequest(
            f"options: {len(options)} keys, at most {MAX_OPTIONS} are accepted", param="options"
        )
    fields: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in (options or {}).items():
        if key in SUPPORTED_OPTIONS:
            if value is not None:
                fields[SUPPORTED_OPTIONS[key]] = value
        elif key not in RUNTIME_OPTIONS:
            unknown.append(key)
    if unknown:  # one line per request, never one per key: this runs on the event loop
        named = [name[:40] for name in unknown[:UNKNOWN_OPTIONS_NAMED]]
        log.info("ignoring unknown Ollama options", count=len(unknown), options=named)
    limit = fields.get("max_tokens")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit < 0:
        del fields["max_tokens"]  # -1, -2: "until the context ends"; other types: the job schema says
    return fields


def _format(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise InvalidRequest(f'format must be "json" or a JSON schema, not {value!r}', param="format")


def _think(value: bool | str | None) -> dict[str, Any]:
    if value is False:
        return {"think": False}
    return {}  # true or a level: the model's template decides (it thinks by default)


def _message(message: OllamaMessage) -> dict[str, Any]:
    """One message in the job's shape: an assistant's calls as the job's ``tool_calls``, a tool's
    result as ``role: "tool"`` naming its call by id or its tool by name (the job matches a result to
    its call by id, else by name, else in order: `edged.tools.render`)."""
    if message.images:
        raise NotSupported("images: the model on this board reads text only", param="messages")
    out: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.role == "tool":
        if message.tool_name:
            out["name"] = message.tool_name
        if message.tool_call_id:
            out["tool_call_id"] = message.tool_call_id
    elif message.tool_calls:  # on another role than assistant the job schema refuses them, named
        out["tool_calls"] = [
            {
                **({"id": call.id} if call.id else {}),
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments or {}},
            }
            for call in message.tool_calls
        ]
    return out


def _job(fields: dict[str, Any]) -> JobRequest:
    """The translated request as a job; a value the job schema refuses (an option of the wrong type
    or out of range, ``"num_predict": 0``) is invalid_request, named as the client sent it."""
    try:
        return JobRequest.model_validate(fields)
    except ValidationError as exc:
        option_of = {field: f"options.{name}" for name, field in SUPPORTED_OPTIONS.items()}
        problems = []
        for err in exc.errors():
            loc = [str(part) for part in err["loc"]]
            if loc and loc[0] in option_of:
                loc[0] = option_of[loc[0]]
            problems.append(f"{'.'.join(loc) or 'body'}: {err['msg']}")
        raise InvalidRequest("invalid request: " + "; ".join(problems)) from exc


def chat_job(body: ChatRequest, loaded: str) -> JobRequest:
    body.refuse_unsupported()
    fields: dict[str, Any] = {
        "model": _local_name(body.model, loaded),
        "messages": [_message(m) for m in body.messages],
        "stream": body.stream,
        **_options(body.options),
        **_think(body.think),
    }
    if body.tools:  # Ollama has no tool_choice: tools mean auto (an empty list: no tools, as in Ollama)
        fields["tools"] = body.tools
    response_format = _format(body.format)
    if response_format is not None:
        fields["response_format"] = response_format
    return _job(fields)


def generate_job(body: GenerateRequest, loaded: str) -> JobRequest:
    body.refuse_unsupported()
    if body.images:
        raise NotSupported("images: the model on this board reads text only", param="images")
    if body.suffix:
        raise NotSupported("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.context:
        raise NotSupported("context (token state of an earlier answer) is not supported", param="context")
    if body.template:
        raise NotSupported("template: edged uses the model's own chat template", param="template")
    fields: dict[str, Any] = {
        "model": _local_name(body.model, loaded),
        "stream": body.stream,
        **_options(body.options),
    }
    if body.raw:
        fields.update(prompt=body.prompt, raw=True)
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        fields["messages"] = [*messages, {"role": "user", "content": body.prompt}]
        fields.update(_think(body.think))
    response_format = _format(body.format)
    if response_format is not None:
        fields["response_format"] = response_format
    return _job(fields)


def ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's calls (OpenAI's shape, the arguments as JSON text) as Ollama writes them: ``{"id",
    "function": {"index", "name", "arguments"}}`` with the arguments an object (Ollama's ids are
    ``call_`` and 8 characters, edged's the job's own, 24)."""
    return [
        {
            "id": call["id"],
            "function": {
                "index": index,
                "name": call["function"]["name"],
                "arguments": json.loads(call["function"]["arguments"]),
            },
        }
        for index, call in enumerate(calls)
    ]


def done_reason(result: JobResult) -> str:
    """Ollama's ``done_reason``: ``stop`` after tool calls too (Ollama has no ``tool_calls`` reason)."""
    return "stop" if result.finish_reason == "tool_calls" else result.finish_reason


def _durations(result: JobResult) -> dict[str, Any]:
    t = result.timings
    return {
        "total_duration": _ns(t.total_ms),
        "load_duration": 0,
        "prompt_eval_count": result.usage.prompt_tokens,
        "prompt_eval_duration": _ns(t.prompt_ms),
        "eval_count": result.usage.completion_tokens,
        "eval_duration": _ns(t.predicted_ms),
    }


DELTA_KEYS = {"content": "content", "reasoning": "thinking"}
"""The job's delta kinds these routes stream, and the field each one fills."""


class _Answer(Wire):
    """An Ollama job's answer: one object, or JSON lines (one per delta, then the ``done`` one),
    each made by `shape`."""

    media_type = "application/x-ndjson"

    def __init__(self, model: str) -> None:
        self.model = model
        """As the client named it."""

    @abstractmethod
    def shape(
        self, content: str, thinking: str, done: bool, calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """One Ollama object of this route (``calls``: a job's, in OpenAI's shape)."""

    def _last(
        self, content: str, thinking: str, result: JobResult, calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        last = self.shape(content, thinking, True, calls)
        last.update(done_reason=done_reason(result), **_durations(result))
        return last

    def body(self, result: JobResult) -> dict[str, Any]:
        return self._last(result.content, result.reasoning_content or "", result, result.tool_calls)

    def delta(self, delta: Delta) -> Iterable[bytes]:
        """Text and thinking as they come; a delta of another kind (a call's pieces) is not sent:
        Ollama sends a call whole (`finished`)."""
        key = DELTA_KEYS.get(delta.kind)
        if key is None:
            return ()
        content, thinking = (delta.text, "") if key == "content" else ("", delta.text)
        return [_line(self.shape(content, thinking, False))]

    def finished(self, result: JobResult) -> Iterable[bytes]:
        """The calls, whole, in a chunk of their own (as Ollama sends a call once it is complete),
        then the ``done`` one."""
        calls = []
        if result.tool_calls:
            calls.append(_line(self.shape("", "", False, result.tool_calls)))
        return [*calls, _line(self._last("", "", result))]

    def failed(self, error: EdgedError) -> Iterable[bytes]:
        return [_line({"error": error.message})]


class ChatAnswer(_Answer):
    """``/api/chat``: the assistant's message (its thinking and its calls beside)."""

    def shape(
        self, content: str, thinking: str, done: bool, calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = ollama_calls(calls)
        return {"model": self.model, "created_at": _now(), "message": message, "done": done}


class GenerateAnswer(_Answer):
    """``/api/generate``: the ``response`` text (and ``thinking``); it has no tools."""

    def shape(
        self, content: str, thinking: str, done: bool, calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _now(), "response": content}
        out["done"] = done
        if thinking:
            out["thinking"] = thinking
        return out


def add_ollama_routes(app: FastAPI, settings: Settings, engine: Engine) -> None:
    """Register ``/api/*`` on ``app`` (the same app serves the socket and the TCP listener)."""
    limit = settings.jobs.max_payload_bytes

    def facts() -> ModelFacts:
        snap = engine.snapshot()
        return snap.model_facts or ModelFacts(format="")

    def details() -> dict[str, Any]:
        model = facts()
        return {
            "parent_model": "",
            "format": model.format,
            "family": model.family,
            "families": [model.family] if model.family else None,
            "parameter_size": model.parameter_size,
            "quantization_level": model.quantization,
        }

    def model_entry() -> dict[str, Any]:
        snap = engine.snapshot()
        path = settings.model.path
        size = facts().file_bytes
        try:
            size = size or (path.stat().st_size if path else 0)
            modified = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) if path else None
        except OSError:
            modified = None
        tag = model_tag(snap.model)
        return {
            "name": tag,
            "model": tag,
            "modified_at": (modified or datetime.now(timezone.utc)).isoformat().replace("+00:00", "Z"),
            "size": size,
            "digest": hashlib.sha256(f"{path}:{size}".encode()).hexdigest(),
            "details": details(),
        }

    @app.get("/api/version", summary="Ollama: the API version these routes follow")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_API_VERSION}

    @app.get("/api/tags", summary="Ollama: the models (the one this board serves)")
    async def tags() -> dict[str, Any]:
        return {"models": [model_entry()]}

    @app.get("/api/ps", summary="Ollama: the loaded models")
    async def ps() -> dict[str, Any]:
        snap = engine.snapshot()
        if not snap.ready:
            return {"models": []}
        entry = model_entry()
        entry.update(expires_at="9999-12-31T23:59:59Z", size_vram=0, context_length=snap.n_ctx)
        return {"models": [entry]}

    @app.post(
        "/api/show",
        summary="Ollama: a model's details, template and capabilities",
        openapi_extra=body_ref(ShowRequest),
    )
    async def show(request: Request) -> Any:
        body = await read_body(request, ShowRequest, limit)
        snap = engine.snapshot()
        _local_name(body.model or body.name or "", snap.model)
        template = engine.chat_template() or ""
        # every model takes tools: in its own format, or edged's generic one (`edged.tools`)
        capabilities = ["completion", "tools"]
        if "<think>" in template:
            capabilities.append("thinking")
        family = details()["family"]
        return {
            "modelfile": f"# served by edged\nFROM {settings.model.path}\n",
            "parameters": "",
            "template": template,
            "details": details(),
            "model_info": {
                "general.architecture": family,
                f"{family or 'model'}.context_length": snap.n_ctx,
                "general.parameter_count": facts().parameters,
            },
            "capabilities": capabilities,
            "modified_at": model_entry()["modified_at"],
        }

    @app.post(
        "/api/chat", summary="Ollama: chat (NDJSON stream by default)", openapi_extra=body_ref(ChatRequest)
    )
    async def chat(request: Request) -> Any:
        body = await read_body(request, ChatRequest, limit)
        snap = engine.snapshot()
        if not body.messages:  # Ollama's "load the model" call
            _local_name(body.model, snap.model)
            return {
                "model": body.model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": ""},
                "done_reason": "load",
                "done": True,
            }
        stream = await JobStream.submit(engine, request, chat_job(body, snap.model))
        return await stream.answer(ChatAnswer(body.model))

    @app.post(
        "/api/generate",
        summary="Ollama: completion of one prompt (NDJSON stream by default)",
        openapi_extra=body_ref(GenerateRequest),
    )
    async def generate(request: Request) -> Any:
        body = await read_body(request, GenerateRequest, limit)
        snap = engine.snapshot()
        if not body.prompt and not body.system:  # Ollama's "load the model" call
            _local_name(body.model, snap.model)
            loaded = {"model": body.model, "created_at": _now(), "response": "", "done": True}
            return {**loaded, "done_reason": "load"}
        stream = await JobStream.submit(engine, request, generate_job(body, snap.model))
        return await stream.answer(GenerateAnswer(body.model))

    def unsupported(what: str) -> Callable[[], Any]:
        async def handler() -> JSONResponse:
            raise NotSupported(
                f"{what} is not supported: edged serves the one model of its configuration "
                f"(model.path = {settings.model.path}); install models with Ansible or by hand"
            )

        return handler

    for route, methods, what in (
        ("/api/pull", ["POST"], "pulling a model"),
        ("/api/push", ["POST"], "pushing a model"),
        ("/api/create", ["POST"], "creating a model"),
        ("/api/copy", ["POST"], "copying a model"),
        ("/api/delete", ["DELETE"], "deleting a model"),
        ("/api/blobs/{digest}", ["HEAD", "POST"], "uploading a blob"),
    ):
        app.add_api_route(route, unsupported(what), methods=methods, include_in_schema=False)
    for route in ("/api/embed", "/api/embeddings"):
        app.add_api_route(
            route,
            unsupported("embeddings (the chat model on this board does not offer them)"),
            methods=["POST"],
            include_in_schema=False,
        )


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

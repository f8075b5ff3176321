"""The job: the one request schema of every transport, its states, its events and its result."""

from __future__ import annotations

import asyncio
import enum
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    field_validator,
    model_validator,
)

from edged.backends import Prompt, SamplingParams
from edged.config import MinP, RepeatPenalty, Temperature, TopK, TopP
from edged.engine.constraints import Constraint
from edged.engine.timings import Timings
from edged.errors import BackendError, EdgedError, InvalidRequest, NotSupported
from edged.tools.family import Family
from edged.tools.parse import CallDelta
from edged.tools.spec import ToolChoice, ToolSpec, parse_choice, parse_tools
from edged.wire import ErrorBody, JobInfo, Usage

if TYPE_CHECKING:
    from edged.journal.intake import Ticket


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:16]}"


class CalledFunction(BaseModel):
    """The function an earlier assistant turn called."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="The tool's name.")
    arguments: str | dict[str, Any] = Field(
        "{}", description="The arguments: a JSON object, or its text (OpenAI's function.arguments)."
    )

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, str) and value.strip():
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):
                raise ValueError("'arguments' is not JSON text") from None
            if not isinstance(parsed, dict):
                raise ValueError("'arguments' is not the text of a JSON object")
        return value


class MessageToolCall(BaseModel):
    """A call an earlier assistant turn made (OpenAI's ``message.tool_calls[]``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = Field(None, description="The call's id, which the tool message answering it names.")
    type: Literal["function"] = Field("function", description="Always function.")
    function: CalledFunction = Field(description="The name and arguments of the call.")


def _message_rules(schema: dict[str, Any]) -> None:
    """`Message`'s checks in code, written into its JSON schema."""
    schema["allOf"] = [
        {
            "if": {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array"}}},
            "then": {"properties": {"role": {"const": "assistant"}}},
        },
        {
            "if": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}},
            "then": {"properties": {"role": {"const": "tool"}}},
        },
        {
            "if": {"properties": {"content": {"type": "null"}}},
            "then": {
                "required": ["tool_calls"],
                "properties": {
                    "role": {"const": "assistant"},
                    "tool_calls": {"type": "array", "minItems": 1},
                },
            },
        },
    ]


TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": ["string", "null"], "maxLength": 8192},
                "parameters": {"type": ["object", "null"]},
                "strict": {"type": "boolean"},
            },
        },
    },
}
"""One of ``tools`` (`edged.tools.spec.parse_tools` checks the rest: unique names, the parameters
a schema of an object within edged's bounds)."""

NAMED_TOOL: dict[str, Any] = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
    },
}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_message_rules)

    role: Literal["system", "user", "assistant", "tool"] = Field(
        description="Who speaks; tool: the result of a call an earlier assistant turn made."
    )
    content: str | None = Field(
        description="What is said; null only for an assistant turn that made tool calls."
    )
    name: str | None = Field(
        None,
        description="Optional speaker name (accepted for OpenAI compatibility); for a tool result, the "
        "tool's name.",
    )
    tool_calls: list[MessageToolCall] | None = Field(
        None, max_length=128, description="The calls an assistant turn made (role assistant)."
    )
    tool_call_id: str | None = Field(None, description="The call a tool result answers (role tool).")

    @model_validator(mode="after")
    def _tool_fields(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("'tool_calls' goes with role 'assistant'")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("'tool_call_id' goes with role 'tool'")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("'content' is null only for an assistant turn with 'tool_calls'")
        return self

    @property
    def has_tools(self) -> bool:
        """A tool result, or an assistant turn that made calls: rendered in the model's tool format."""
        return self.role == "tool" or bool(self.tool_calls)


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    name: str = Field("response", max_length=64, description="The schema's name (OpenAI requires one).")
    description: str | None = Field(None, description="Accepted for OpenAI compatibility.")
    schema_: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"},
        alias="schema",
        description="A JSON schema the answer must match (llama.cpp's converter: objects, arrays, "
        "strings with maxLength/pattern/format, numbers, enums, $ref/$defs, anyOf, ...).",
    )
    strict: bool | None = Field(None, description="Accepted; the answer always obeys the schema.")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={  # `_schema_with_type`, for /openapi.json
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
            "else": {"properties": {"json_schema": {"type": "null"}}},
        },
    )

    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text: free; json_object: any JSON object; json_schema: an object of that schema."
    )
    json_schema: JsonSchemaFormat | None = Field(None, description="With type json_schema.")

    @model_validator(mode="after")
    def _schema_with_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs 'json_schema': {\"name\", \"schema\"}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"'json_schema' goes with type 'json_schema', not {self.type!r}")
        return self


def _whole(value: Any) -> Any:
    """JSON has one kind of number: 2.0 is the integer 2, as JSON Schema says (2.5, "2", true are not)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_whole)]
"""An integer field of a strict request model: a JSON integer, written 2 or 2.0."""
OptionalJsonInt = Annotated[int | None, BeforeValidator(_whole)]
"""`JsonInt` or null (the validator outside the union keeps ``ge``/``le`` in the JSON schema)."""

TOKEN_ID = re.compile(r"-?[0-9]{1,12}")
"""A ``logit_bias`` key: a token id in decimal (JSON object keys are strings)."""


def job_schema_rules(schema: dict[str, Any]) -> None:
    """The rules `JobRequest` checks in code, written into its JSON schema (``/openapi.json``), so
    clients and schema-driven tools know a job's shape exactly."""
    props = schema["properties"]
    nonempty = {"type": "string", "minLength": 1}
    props["stop"]["anyOf"][:2] = [nonempty, {"type": "array", "items": nonempty, "maxItems": 4}]
    props["logit_bias"]["anyOf"][0]["propertyNames"] = {"pattern": f"^{TOKEN_ID.pattern}$"}
    props["tools"]["anyOf"][0] = {"type": "array", "items": TOOL_SCHEMA, "maxItems": 128}
    props["tool_choice"]["anyOf"][:2] = [{"enum": ["none", "auto", "required"]}, NAMED_TOOL]
    json_format = {"type": "object", "required": ["type"], "properties": {"type": {"not": {"const": "text"}}}}
    schema["allOf"] = [
        {  # exactly one of messages and prompt
            "oneOf": [
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
            ]
        },
        {  # raw: the prompt verbatim, so no chat template to think in
            "if": {"required": ["raw"], "properties": {"raw": {"const": True}}},
            "then": {
                "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string", "minLength": 1},
                    "think": {"type": "null"},
                    "reasoning_budget": {"type": "null"},
                },
            },
        },
        {  # a grammar or a JSON response_format, not both
            "not": {
                "required": ["grammar", "response_format"],
                "properties": {"grammar": {"type": "string"}, "response_format": json_format},
            }
        },
    ]


class JobRequest(BaseModel):
    """The one job schema of every transport. Types are strict (``"max_tokens": "5"`` or ``true``,
    ``"stream": 1`` are invalid_request, not coerced) and numbers finite (no NaN or Infinity)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra=job_schema_rules
    )

    id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._:-]{1,128}$", description="Client-chosen job id; generated if absent."
    )
    model: str | None = Field(None, description="Model name; must match the loaded model when given.")
    messages: list[Message] | None = Field(None, min_length=1, description="Chat messages.")
    prompt: str | None = Field(None, description="A single user prompt (or raw text when raw is true).")
    raw: bool = Field(False, description="Feed prompt to the model verbatim, without the chat template.")
    max_tokens: OptionalJsonInt = Field(
        None, ge=1, description="Most tokens to generate; clamped to the cap."
    )
    temperature: Temperature | None = Field(None, description="Sampling temperature.")
    top_p: TopP | None = Field(None, description="Nucleus sampling mass.")
    top_k: Annotated[TopK | None, BeforeValidator(_whole)] = Field(
        None, description="Top-k sampling; 0 = off."
    )
    min_p: MinP | None = Field(None, description="Min-p sampling.")
    repeat_penalty: RepeatPenalty | None = Field(
        None, description="Repetition penalty; 1 = off, above 1 penalises repeats, below 1 favours them."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Penalise tokens by how often they appeared (OpenAI's meaning)."
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Penalise tokens that appeared at all (OpenAI's meaning)."
    )
    logit_bias: dict[Annotated[int, Strict(False)], Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None,
        max_length=1024,
        description="Token id -> bias added to its logit, -100 (ban) to 100 (force), OpenAI's meaning.",
    )
    seed: OptionalJsonInt = Field(None, ge=0, description="Sampling seed for reproducible output.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end generation.")
    stream: bool = Field(False, description="Stream deltas as they are generated.")
    timeout_s: float | None = Field(None, gt=0, description="Deadline in seconds, queued plus running.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-text (benchmarks).")
    cache_prompt: bool = Field(
        True,
        description="Reuse a cached prompt prefix (llama-server's name). A prefix computed inside "
        "another prompt's batch can differ from a fresh computation in the last bits, which can flip "
        "a near-tie token at temperature 0; false computes the whole prompt.",
    )

    response_format: ResponseFormat | None = Field(
        None,
        description="OpenAI's response_format: the answer is a JSON object (of a schema). With a "
        "thinking model the reasoning stays free and the answer after </think> obeys.",
    )
    grammar: str | None = Field(
        None, max_length=65536, description="A raw GBNF grammar the answer obeys (llama.cpp's syntax)."
    )
    think: bool | None = Field(
        None,
        description="false: skip the reasoning of a thinking model (the <think> block is closed in the "
        "prompt) for the fastest answer. Default: the model's template decides.",
    )
    reasoning_budget: OptionalJsonInt = Field(
        None,
        ge=0,
        description="Most reasoning tokens; then edged closes the <think> block and the answer "
        "follows (0 is think=false).",
    )
    tools: list[dict[str, Any]] | None = Field(
        None,
        description='Functions the model may call, OpenAI\'s shape: {"type": "function", "function": '
        "{name, description, parameters}}, at most 128. The model is told about them in its own format "
        "and its calls come back in the result's tool_calls.",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None,
        description="none (no call), auto (the model decides; the default with tools), required (at "
        'least one call) or {"type": "function", "function": {"name": ...}} (a call of that tool).',
    )
    parallel_tool_calls: bool | None = Field(
        None, description="false: at most one call per answer (default true: one or more)."
    )
    context_overflow: Literal["error", "trim_history"] | None = Field(
        None,
        description="A chat whose prompt is over the context cap: error (context_length_exceeded) or "
        "trim_history (its oldest turns dropped until it fits with room for the answer; the system "
        "messages, the last user turn and each call with its result are kept; timings.trimmed_messages "
        "says how many went). Default: the API's (jobs.context_overflow: trim_history on Ollama's "
        "routes, error elsewhere).",
    )

    _tool_specs: list[ToolSpec] = PrivateAttr(default_factory=list)
    _tool_choice: ToolChoice = PrivateAttr(default_factory=lambda: ToolChoice("none"))

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> Any:
        """Keys are token ids in decimal: not ``" 1"``, ``"1.0"`` or ``"+1"`` (which int() would take)."""
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, bool) or not (
                    isinstance(key, int) or (isinstance(key, str) and TOKEN_ID.fullmatch(key))
                ):
                    raise ValueError(f"'logit_bias' keys are token ids in decimal, not {key!r}")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if self.raw and not self.prompt:  # an empty raw prompt has no token to continue from
            raise ValueError("'raw' needs a non-empty 'prompt'")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' takes at most 4 non-empty strings")
        json_format = self.response_format is not None and self.response_format.type != "text"
        if self.grammar is not None and json_format:
            raise ValueError("give 'grammar' or a JSON 'response_format', not both")
        if any(not -100 <= bias <= 100 for bias in (self.logit_bias or {}).values()):
            raise ValueError("'logit_bias' values go from -100 to 100")
        if len(self.logit_bias or {}) > 1024:
            raise ValueError("'logit_bias' takes at most 1024 tokens")
        if self.raw and (self.think is not None or self.reasoning_budget is not None):
            raise ValueError("'think' and 'reasoning_budget' need the chat template ('raw' is true)")
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        """Parse ``tools`` and ``tool_choice`` (`edged.tools.spec`); raises `InvalidRequest` naming
        the field (``tools[2].function.parameters``), which the transports answer as such."""
        specs = parse_tools(self.tools)
        choice = parse_choice(specs, self.tool_choice)
        self._set_tools(specs, choice)

    def _set_tools(self, specs: list[ToolSpec], choice: ToolChoice) -> None:
        if specs and choice.mode != "none":
            if self.raw:
                raise InvalidRequest("'tools' need the chat template ('raw' is true)", param="tools")
            json_format = self.response_format is not None and self.response_format.type != "text"
            if self.grammar is not None or json_format:
                raise NotSupported(
                    "tools with a grammar or a JSON response_format: a tool job's answer is already "
                    "constrained to calls (or give tool_choice 'none')",
                    param="tools",
                )
        self._tool_specs, self._tool_choice = specs, choice

    @property
    def tool_specs(self) -> list[ToolSpec]:
        """The tools offered, validated (empty without ``tools``)."""
        return self._tool_specs

    @property
    def choice(self) -> ToolChoice:
        """How the tools are to be used (``none`` without tools)."""
        return self._tool_choice

    @property
    def uses_tools(self) -> bool:
        """The model is told about tools and may call them (tools offered, choice not ``none``)."""
        return self._tool_choice.mode != "none" and bool(self._tool_choice.allowed(self._tool_specs))

    @property
    def parallel(self) -> bool:
        return self.parallel_tool_calls is not False

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobResult(BaseModel):
    id: str
    model: str
    created: int
    content: str
    """The answer's text; with tool calls, only the text beside them (often empty): never markup."""
    reasoning_content: str | None
    finish_reason: Literal["stop", "length", "tool_calls"]
    usage: Usage
    timings: Timings
    parsed: Any = None
    """The answer as a JSON value, for a job with a JSON response_format (validated)."""
    notes: list[str] | None = None
    """What the backend could not apply of this job (e.g. sampling an NPU runtime fixes at init)."""
    tool_calls: list[dict[str, Any]] | None = None
    """The calls the model made, OpenAI's shape (``id``, ``type: "function"``, ``function: {name,
    arguments}`` with the arguments as JSON text), each validated against its tool's schema; None
    without calls."""


@dataclass(frozen=True)
class Delta:
    kind: Literal["content", "reasoning"]
    text: str


@dataclass(frozen=True)
class CallPiece:
    """A piece of a tool call as the model writes it (OpenAI's streamed ``delta.tool_calls[]``): the
    first piece of a call carries its id and name, the next ones arguments text. Not a `Delta`: a
    transport that streams text only (Ollama's routes, MQTT's chunk messages) skips it, and gets the
    calls whole, validated, with the result, as every transport does."""

    call: CallDelta


@dataclass(frozen=True)
class Finished:
    result: JobResult


@dataclass(frozen=True)
class Failed:
    error: EdgedError


JobEvent = Delta | CallPiece | Finished | Failed


@dataclass(frozen=True)
class ToolPlan:
    """A job whose model may call tools: how its answer is read back (`edged.tools.parse`)."""

    family: Family
    tools: list[ToolSpec]
    choice: ToolChoice
    parallel: bool


@dataclass(frozen=True)
class Prepared:
    """A request turned into what a backend runs: prompt tokens under the cap and sampling."""

    prompt: Prompt
    params: SamplingParams
    clamped: bool
    """max_tokens was lowered to fit the context window."""
    in_think: bool
    """The chat template opened a ``<think>`` block: the output starts inside the reasoning."""
    constraint: Constraint | None = None
    """What the answer must be (JSON schema, GBNF, tool calls), checked when the job ends."""
    tools: ToolPlan | None = None
    """The model may call tools: its answer is parsed into content and calls when the job ends."""
    trimmed_messages: int = 0
    """The oldest messages dropped to fit the context (``context_overflow: trim_history``)."""


class Job:
    """One request on its way through the engine; transports read `events` or await `wait`.

    Only the event loop's thread touches a job's events and final state; the scheduler's thread
    hands results over with ``call_soon_threadsafe``. ``stop_reason`` is the one field both write:
    the loop sets it to stop a running job, the scheduler reads it between steps.
    """

    def __init__(self, job_id: str, request: JobRequest, prepared: Prepared, deadline: float) -> None:
        self.id = job_id
        self.request = request
        self.prepared = prepared
        self.deadline = deadline
        self.state = JobState.QUEUED
        self.submitted = time.perf_counter()
        self.created = int(time.time())
        self.stop_reason: EdgedError | None = None
        self.result: JobResult | None = None
        self.error: EdgedError | None = None
        self.completion_tokens = 0
        self.finished_at: float | None = None
        self._events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._finished = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None
        self.origin = ""
        """Where the job came from (``socket``, ``tcp:<key name>``, ``mqtt``), for the logs."""
        self.peer: str | None = None
        """The client: ``pid=.. uid=.. gid=..`` on the Unix socket, the address on TCP."""
        self.owner = ""
        """Who the job's id belongs to (``tcp:<key name>``, ``socket:uid=<n>``, ``mqtt:<reply
        topic>``): ids are unique per owner, and only the owner reads or cancels the job remotely."""
        self.ticket: Ticket | None = None
        """Its row in the job journal, if journaled (`edged.journal.intake`)."""

    @property
    def prompt(self) -> Prompt:
        return self.prepared.prompt

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def push(self, event: JobEvent) -> None:
        if self.request.stream or isinstance(event, (Finished, Failed)):
            self._events.put_nowait(event)

    def finish(
        self, state: JobState, result: JobResult | None = None, error: EdgedError | None = None
    ) -> bool:
        """Settle the job once; False if it had already finished."""
        if self.finished:
            return False
        self.state, self.result, self.error = state, result, error
        self.finished_at = time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
        self.push(Finished(result) if result is not None else Failed(error or BackendError("no result")))
        self._finished.set()
        return True

    async def events(self) -> AsyncIterator[JobEvent]:
        """Deltas and call pieces (when streaming), then exactly one `Finished` or `Failed`."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    async def wait(self) -> JobResult:
        """The result, or the job's error raised."""
        await self._finished.wait()
        if self.result is None:
            raise self.error or BackendError("job ended without a result")
        return self.result

    def info(self) -> JobInfo:
        return JobInfo(
            id=self.id,
            state=self.state.value,
            origin=self.origin,
            completion_tokens=self.completion_tokens,
            error=ErrorBody(**self.error.to_dict()["error"]) if self.error else None,
        )

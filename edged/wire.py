"""The documents that cross a package seam or leave the process, as pydantic models: one type both
ends compile against.

- `Presence`: the retained ``edged/<device>/status`` message (written by the daemon, read by the
  fleet aggregator);
- `TelemetryReport`: the periodic ``edged/<device>/telemetry`` message (`edged.telemetry.report`;
  read by the aggregator and the fleet's ``/metrics``);
- `DoneMessage`, `ErrorMessage`, `ChunkMessage`: MQTT answers (`edged.engine.answer`, the journal,
  `edged.transports.mqtt`);
- `StatusDocument`: ``GET /status``; `JobInfo`: a job in ``/status``'s ``running`` and ``/v1/jobs``.

Producers build the model and send `Wire.dump()`: field order is declaration order, and only the
fields a producer set are written, so the JSON is exactly what each document was before it was typed.
Numbers are strict (a boolean or a string is no number, NaN and infinity are refused) because readers
get documents from anything that can publish on a broker: `lenient` reads such a document, leaving
out every field of the wrong type instead of refusing it.

This module imports nothing of edged: the fleet reads it without loading an engine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)


def _finite_number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("a number is needed")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a finite number is needed")
    return value


Number = Annotated[int | float, PlainValidator(_finite_number), WithJsonSchema({"type": "number"})]
"""A JSON number kept as sent (an integer stays one, so the JSON is written back unchanged)."""
Text = StrictStr
Count = StrictInt
Flag = StrictBool


class Wire(BaseModel):
    """A wire document: unknown fields are ignored (a newer edged may add some)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    def dump(self) -> dict[str, Any]:
        """The JSON-ready document: the fields that were set, in declaration order."""
        return self.model_dump(mode="json", exclude_unset=True)


# -- errors, usage, jobs ---------------------------------------------------------------------------


class ErrorBody(Wire):
    """`edged.errors.EdgedError.to_dict()["error"]`: OpenAI's error object plus an error's details."""

    model_config = ConfigDict(extra="allow")

    code: Text | None = Field(None, description="Stable error code (edged.errors).")
    message: Text | None = Field(None, description="What went wrong, for a person.")
    type: Text | None = Field(None, description="OpenAI's error type.")
    param: Text | None = Field(None, description="The request field at fault, if one is.")


class Usage(Wire):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count


class JobInfo(Wire):
    """A job the engine holds (``/status`` ``engine.running``, ``/v1/jobs`` without a journal)."""

    id: Text = Field(description="The job id.")
    state: Text = Field(description="queued, running, done, failed or cancelled.")
    origin: Text = Field(description="socket, tcp:<key name> or mqtt.")
    completion_tokens: Count = Field(description="Tokens generated so far.")
    error: ErrorBody | None = Field(description="Why it failed, for a failed or cancelled job.")


class LastJob(Wire):
    """The last finished job, without its id (telemetry goes to every reader of the broker)."""

    finish_reason: Text | None = None
    usage: Usage | None = None
    timings: dict[str, Number | Text | None] | None = None


# -- MQTT answers ----------------------------------------------------------------------------------


class DoneMessage(Wire):
    """A finished job's answer on MQTT (also what the journal keeps, and `GET /v1/jobs` shows)."""

    id: Text = Field(description="The job id.")
    status: Literal["done"] = "done"
    content: Text | None = Field(description="The answer; null where the journal keeps no text.")
    reasoning_content: Text | None = Field(description="A thinking model's reasoning, if any.")
    finish_reason: Literal["stop", "length", "tool_calls"] = Field(
        description="stop: the model ended; length: max_tokens; tool_calls: the model called tools."
    )
    usage: Usage = Field(description="Prompt, completion and total tokens.")
    timings: dict[str, Any] = Field(
        description="llama.cpp server's timings plus edged's own (docs: Timings). Not checked here: "
        "an answer is never lost to a figure of an unexpected type."
    )
    model: Text = Field(description="The model that answered.")
    device_id: Text = Field(description="The device that answered.")
    notes: list[Text] | None = Field(None, description="Settings the backend could not apply (if any).")
    parsed: Any = Field(None, description="A JSON response_format: the answer, parsed (if any).")
    tool_calls: list[dict[str, Any]] | None = Field(
        None,
        description="The calls the model made (a job with tools), OpenAI's shape: id, type 'function', "
        "function {name, arguments as JSON text}; content holds only the text beside them.",
    )
    duplicate: Flag | None = Field(None, description="true: a redelivered job, answered from the journal.")


class ErrorMessage(Wire):
    """A job's error on MQTT (on the reply topic, or ``edged/<device>/errors``)."""

    id: Text | None = Field(description="The job id, if the request got far enough to have one.")
    status: Literal["error"] = "error"
    error: ErrorBody = Field(description="The error (docs: Error codes).")
    device_id: Text = Field(description="The device that answered.")
    duplicate: Flag | None = Field(None, description="true: a redelivered job, answered from the journal.")


class ChunkMessage(Wire):
    """A streamed job's delta on MQTT, before its `DoneMessage`."""

    id: Text = Field(description="The job id.")
    seq: Count = Field(description="0, 1, 2, ... in order.")
    delta: Text = Field(description="The text generated since the last chunk.")
    kind: Literal["content", "reasoning"] = Field(description="reasoning: inside <think>...</think>.")


# -- presence --------------------------------------------------------------------------------------


class Presence(Wire):
    """The retained status message: who the device is and what it runs. ``state`` is ``online`` while
    connected; ``offline`` on a clean stop, and in the Last Will."""

    device_id: Text | None = Field(None, description="The device's id (device_id).")
    board: Text | None = Field(None, description="The board's model, as its device tree says.")
    soc: Text | None = Field(None, description="The SoC's compatible string, if known.")
    profile: Text | None = Field(None, description="The board profile in use.")
    backend: Text | None = Field(None, description="The backend running the model (llamacpp, rkllm).")
    model: Text | None = Field(None, description="The model's name.")
    slots: Count | None = Field(None, description="Sequences decoded together.")
    version: Text | None = Field(None, description="edged's version.")
    state: Literal["online", "offline"] | None = Field(None, description="Set by the MQTT transport.")
    interval_s: Number | None = Field(None, description="The telemetry interval (none today; read if sent).")


# -- thermals and hardware (edged.telemetry.hardware.read_all, with the governor) --------------------


class TripPoint(Wire):
    type: Text | None = None
    temp_c: Number | None = None


class ThermalZone(Wire):
    zone: Text | None = None
    type: Text | None = None
    temp_c: Number | None = None
    trips: list[TripPoint] | None = None
    watched: Flag | None = None


class CpuPolicy(Wire):
    policy: Text | None = None
    cpus: list[Count] | None = None
    cur_mhz: Number | None = None
    max_mhz: Number | None = None
    hw_max_mhz: Number | None = None
    capped: Flag | None = None


class Npu(Wire):
    load_pct: dict[str, Number] | None = None
    freq_mhz: Number | None = None


class Throttling(Wire):
    raw: Count | None = None
    source: Text | None = None
    now: dict[str, Flag] | None = None
    since_boot: dict[str, Flag] | None = None
    active: Flag | None = None


class SystemFigures(Wire):
    mem_total_mb: Number | None = None
    mem_available_mb: Number | None = None
    load_1m: Number | None = None
    load_5m: Number | None = None
    load_15m: Number | None = None
    uptime_s: Number | None = None


class GovernorStatus(Wire):
    state: Text | None = None
    hottest_c: Number | None = None
    hottest_zone: Text | None = None
    limits: dict[str, Any] | None = None
    transitions: dict[str, Count] | None = None
    last_change: dict[str, Any] | None = None


class Thermals(Wire):
    zones: list[ThermalZone] | None = None
    cpufreq: list[CpuPolicy] | None = None
    npu: Npu | None = None
    throttling: Throttling | None = None
    system: SystemFigures | None = None
    governor: GovernorStatus | None = None


# -- the engine's figures --------------------------------------------------------------------------


class QueueFigures(Wire):
    depth: Count | None = None
    max_depth: Count | None = None


class SlotFigures(Wire):
    total: Count | None = None
    effective: Count | None = None
    active: Count | None = None


class PrefixCache(Wire):
    """The prefix cache's counters in /status (`edged.backends.base.CacheStats`)."""

    lookups: Count | None = None
    hits: Count | None = None
    hit_tokens: Count | None = None
    saved_prefill_ms: Number | None = None
    parked: Count | None = None
    parked_tokens: Count | None = None
    evictions: Count | None = None
    disk_hits: Count | None = None
    disk_warmed: Count | None = None
    disk_entries: Count | None = None
    disk_bytes: Count | None = None
    disk_saves: Count | None = None
    disk_rejected: Count | None = None
    notes: list[Text] | None = None


class CacheSummary(Wire):
    """The prefix cache's counters a telemetry report carries."""

    lookups: Count | None = None
    hits: Count | None = None
    hit_tokens: Count | None = None
    saved_prefill_ms: Number | None = None
    parked: Count | None = None
    disk_entries: Count | None = None
    disk_hits: Count | None = None


class Throughput(Wire):
    """One window of `edged.telemetry.throughput.ThroughputWindow.summary`."""

    window_s: Number | None = None
    jobs_done: Count | None = None
    jobs_failed: Count | None = None
    jobs_rejected: Count | None = None
    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None
    prefill_tokens_per_s_p50: Number | None = None
    decode_tokens_per_s_p50: Number | None = None
    ttft_ms_p50: Number | None = None
    ttft_ms_p95: Number | None = None
    queue_wait_ms_p50: Number | None = None
    s_per_1k_tokens: Number | None = None
    tokens_per_s: Number | None = None
    s_per_1k_tokens_aggregate: Number | None = None


class HistogramDoc(Wire):
    """A cumulative histogram: ``[[le, count of observations <= le], ..., ["+Inf", count]]``."""

    buckets: list[tuple[Text, Count]] | None = None
    sum: Number | None = None
    count: Count | None = None


# -- telemetry -------------------------------------------------------------------------------------


class Summary(Wire):
    """The figures a fleet view shows, for the first throughput window."""

    window: Text | None = None
    decode_tokens_per_s: Number | None = None
    tokens_per_s: Number | None = None
    s_per_1k_tokens: Number | None = None
    ttft_ms_p50: Number | None = None
    hottest_c: Number | None = None
    thermal_state: Text | None = None
    throttled: Flag | None = None


class TelemetryReport(Wire):
    """The periodic telemetry message (schema 1)."""

    schema_: Count = Field(alias="schema", description="1; a reader skips schemas it does not know.")
    device_id: Text | None = Field(None, description="The device's id.")
    ts: Number | None = Field(None, description="Unix time of the report.")
    interval_s: Number | None = Field(None, description="Seconds to the next report (telemetry.interval_s).")
    version: Text | None = Field(None, description="edged's version.")
    backend: Text | None = Field(None, description="The backend running the model.")
    model: Text | None = Field(None, description="The model's name.")
    state: Text | None = Field(None, description="The engine's state: loading, ready, failed, stopping.")
    queue: QueueFigures = Field(description="Jobs waiting, and the most that may.")
    slots: SlotFigures | None = Field(None, description="Slots: total, under the governor, running.")
    jobs: dict[str, Count] | None = Field(None, description="Jobs by outcome since start.")
    totals: dict[str, Number] | None = Field(None, description="Tokens and queue wait since start.")
    throughput: dict[str, Throughput] | None = Field(None, description="By window label (1m, 15m).")
    prefix_cache: CacheSummary | None = Field(None, description="null for a backend without one.")
    summary: Summary = Field(description="The figures of the first window, for dashboards.")
    last_job: LastJob | None = Field(None, description="The last finished job (no id).")
    thermals: Thermals | None = Field(None, description="Zones, clocks, NPU, throttling, system, governor.")
    histograms: dict[str, HistogramDoc] | None = Field(None, description="Per-job, cumulative since start.")
    event: Text | None = Field(None, description="Why an unscheduled report was sent (thermal_transition).")

    model_config = ConfigDict(populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)


# -- /status ---------------------------------------------------------------------------------------


class BoardReport(Wire):
    model: Text | None = None
    compatible: list[Text] | None = None
    soc: Text | None = None
    source: Text | None = None
    root: Text | None = None
    profile: Text | None = None
    profile_file: Text | None = None
    profile_reason: Text | None = None


class BackendReport(Wire):
    name: Text
    forced: Flag
    considered: list[dict[str, Any]] = Field(description="Every backend of the profile and why (not).")
    fallback_reasons: list[Text]
    details: dict[str, Any] = Field(description="What the backend says of itself (free-form).")


class ModelReport(Wire):
    name: Text
    path: Text
    ctx: Count


class StructuredOutput(Wire):
    available: Flag
    reason: Text | None
    schema_cache: dict[str, Any]


class EngineStatus(Wire):
    """The ``engine`` part of /status (`edged.engine.snapshot.EngineSnapshot.status`)."""

    state: Literal["loading", "ready", "failed", "stopping"]
    backend: Text
    fallback_reasons: list[Text]
    load_error: Text | None
    slots: SlotFigures
    queue: QueueFigures
    running: list[JobInfo]
    jobs: dict[str, Count]
    totals: dict[str, Number]
    thermal: dict[str, Any]
    prefix_cache: PrefixCache | None
    structured_output: dict[str, Any]
    last_job: LastJob | None
    throughput: dict[str, Throughput]


class StatusDocument(Wire):
    """``GET /status`` on the Unix socket (the TCP listener serves an allowlisted part)."""

    device_id: Text = Field(description="The device's id.")
    version: Text = Field(description="edged's version.")
    pid: Count = Field(description="The daemon's process id.")
    uptime_s: Number = Field(description="Seconds since the daemon started.")
    board: BoardReport = Field(description="The board detected, and the profile chosen for it.")
    backend: BackendReport = Field(description="The backend chosen, why, and what it says of itself.")
    model: ModelReport = Field(description="The model's name, file and context per sequence.")
    engine: EngineStatus = Field(description="Queue, slots, jobs, cache, throughput.")
    thermals: Thermals = Field(description="Zones, clocks, NPU, throttling, system, governor.")
    mqtt: dict[str, Any] | None = Field(description="The broker connection, or null without MQTT.")
    listeners: list[dict[str, Any]] = Field(description="The Unix socket, and the TCP listener if any.")


# -- reading documents from others -----------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)

_SHAPE_ERRORS = frozenset(
    {"model_type", "model_attributes_type", "dict_type", "list_type", "tuple_type", "missing"}
)
MAX_DROPS = 256
"""Most fields `lenient` leaves out of one document before it gives up on it."""


class Unreadable(ValueError):
    """A document whose shape a reader relies on is wrong (`lenient`'s ``shapes``)."""


def _path(loc: tuple[int | str, ...]) -> str:
    """``("thermals", "zones", 3, "temp_c")`` -> ``thermals.zones.*.temp_c``."""
    return ".".join("*" if isinstance(part, int) else str(part) for part in loc)


def _noun(class_name: str) -> str:
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", class_name).lower()
    return f"{'an' if words[:1] in 'aeiou' else 'a'} {words}"


def _shape_problem(error: Any) -> str:
    loc = tuple(error["loc"])
    if error["type"] == "missing":
        return f"{_path(loc)!r} is missing"
    if isinstance(loc[-1], int) and error["type"] in ("model_type", "model_attributes_type"):
        return f"{_noun(error.get('ctx', {}).get('class_name', 'item'))} is not an object"
    kind = "a list" if error["type"] in ("list_type", "tuple_type") else "an object"
    return f"{_path(loc)!r} is not {kind}"


def _drop(data: Any, loc: tuple[int | str, ...]) -> bool:
    """Remove what ``loc`` points at (the deepest part of it present in ``data``); False if nothing."""
    parent: Any = None
    key: Any = None
    node = data
    for part in loc:
        present = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        )
        if not present:
            break  # a union's branch name, or a field that is missing
        parent, key, node = node, part, node[part]
    if parent is None:
        return False
    del parent[key]
    return True


def _copy(value: Any) -> Any:
    """A copy of the containers (the leaves are shared): `lenient` edits its copy, not the caller's."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def lenient(model: type[M], data: Any, *, shapes: Collection[str] = ()) -> tuple[M, int]:
    """``data`` as ``model``, every field of a wrong type or shape left out (so it reads as its
    default); returns the model and how many fields were left out.

    ``shapes`` are the paths (``queue``, ``thermals.zones``, ``thermals.zones.*`` for their items)
    whose shape the reader relies on: a wrong type or a missing one there raises `Unreadable`, as does
    a document that is not an object, or one with more than `MAX_DROPS` bad fields."""
    if not isinstance(data, dict):
        raise Unreadable("not a JSON object")
    data = _copy(data)
    dropped = 0
    while True:
        try:
            return model.model_validate(data), dropped
        except ValidationError as exc:
            errors = exc.errors()
        for error in errors:
            if error["type"] in _SHAPE_ERRORS and _path(tuple(error["loc"])) in shapes:
                raise Unreadable(_shape_problem(error)) from None
            if error["type"] == "missing" and len(error["loc"]) < 2:
                raise Unreadable(_shape_problem(error)) from None
        removed = 0
        # The last item of a list first, so removing one does not shift the index of another.
        for error in sorted(errors, key=lambda e: _sort_key(tuple(e["loc"])), reverse=True):
            loc = tuple(error["loc"])
            # A part missing (of a pair, or a nested document's required field): drop what holds it.
            removed += _drop(data, loc[:-1] if error["type"] == "missing" else loc)
        dropped += removed
        if not removed:
            raise Unreadable(str(errors[0]["msg"]))
        if dropped > MAX_DROPS:
            raise Unreadable(f"more than {MAX_DROPS} fields of the wrong type")


def _sort_key(loc: tuple[int | str, ...]) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, part) if isinstance(part, int) else (1, part) for part in loc)


WIRE_DOCUMENTS: tuple[type[Wire], ...] = (
    Presence,
    TelemetryReport,
    DoneMessage,
    ErrorMessage,
    ChunkMessage,
    StatusDocument,
    JobInfo,
)
"""The documents of the external contract (docs/contract.md lists their fields)."""

"""`edged.wire`: the documents producers build from the models are, byte for byte, the documents they
wrote as dicts before (each expected document below is the old producer's dict, written out), and
`lenient` reads a stranger's document field by field."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from edged.backends import Prompt, SamplingParams
from edged.backends.base import CacheStats
from edged.engine.answer import done_message, error_message
from edged.engine.job import Job, JobRequest, JobResult, JobState, Prepared, Usage
from edged.engine.snapshot import EngineSnapshot, EngineState, SlotsInfo
from edged.engine.timings import Timings
from edged.errors import InvalidRequest, QueueFull
from edged.telemetry.report import CACHE_SUMMARY
from edged.wire import (
    CacheSummary,
    ChunkMessage,
    DoneMessage,
    ErrorMessage,
    PrefixCache,
    Presence,
    TelemetryReport,
    Unreadable,
    lenient,
)


def same_json(produced: dict[str, Any], expected: dict[str, Any]) -> None:
    """Equal as JSON text: the same keys in the same order, the same numbers (1 is not 1.0)."""
    assert json.dumps(produced) == json.dumps(expected)


TIMINGS = Timings(
    cache_n=3,
    prompt_n=10,
    prompt_ms=12.5,
    prompt_per_token_ms=1.25,
    prompt_per_second=800.0,
    predicted_n=5,
    predicted_ms=40.0,
    predicted_per_token_ms=10.0,
    predicted_per_second=100.0,
    queue_ms=0.0,
    ttft_ms=13.1,
    total_ms=55.0,
    s_per_1k_tokens=10.0,
)


def result(**changes: Any) -> JobResult:
    fields: dict[str, Any] = {
        "id": "job-1",
        "model": "smollm2",
        "created": 1,
        "content": "Hi.",
        "reasoning_content": None,
        "finish_reason": "stop",
        "usage": Usage(prompt_tokens=13, completion_tokens=5, total_tokens=18),
        "timings": TIMINGS,
    }
    return JobResult(**{**fields, **changes})


def old_done(r: JobResult, device_id: str, *, content: bool = True) -> dict[str, Any]:
    """engine/answer.py's done_message as it was before the wire models."""
    message: dict[str, Any] = {
        "id": r.id,
        "status": "done",
        "content": r.content if content else None,
        "reasoning_content": r.reasoning_content if content else None,
        "finish_reason": r.finish_reason,
        "usage": r.usage.model_dump(),
        "timings": r.timings.model_dump(),
        "model": r.model,
        "device_id": device_id,
    }
    if r.notes:
        message["notes"] = r.notes
    if r.parsed is not None and content:
        message["parsed"] = r.parsed
    return message


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"reasoning_content": "think", "finish_reason": "length"},
        {"notes": ["seed not applied"]},
        {"parsed": {"a": [1, 2.5, None]}, "content": '{"a": [1, 2.5, null]}'},
        {"parsed": 0},
    ],
)
@pytest.mark.parametrize("content", [True, False])
def test_the_done_message_is_the_one_written_before(changes: dict[str, Any], content: bool) -> None:
    r = result(**changes)
    message = done_message(r, "dev", content=content)
    same_json(message, old_done(r, "dev", content=content))
    same_json(DoneMessage.model_validate(message).dump(), message)


def test_the_error_message_keeps_the_errors_details_in_order() -> None:
    error = QueueFull("the queue is full", retry_after_s=2)
    message = error_message("job-9", error, "dev")
    same_json(
        message, {"id": "job-9", "status": "error", "error": error.to_dict()["error"], "device_id": "dev"}
    )
    assert list(message["error"])[:4] == ["code", "message", "type", "param"]
    same_json(
        error_message(None, InvalidRequest("bad"), "d"),
        {"id": None, "status": "error", "error": InvalidRequest("bad").to_dict()["error"], "device_id": "d"},
    )
    same_json(ErrorMessage.model_validate(message).dump(), message)


def test_a_chunk_is_id_seq_delta_kind() -> None:
    chunk = ChunkMessage(id="job-1", seq=0, delta="Hel", kind="content").dump()
    same_json(chunk, {"id": "job-1", "seq": 0, "delta": "Hel", "kind": "content"})


def job() -> Job:
    prepared = Prepared(
        Prompt("hi", [1]),
        SamplingParams(max_tokens=1, temperature=0, top_p=1, top_k=0, min_p=0, repeat_penalty=1),
        clamped=False,
        in_think=False,
    )
    j = Job("job-2", JobRequest(prompt="hi"), prepared, deadline=0.0)
    j.origin, j.completion_tokens = "tcp:ci", 7
    return j


def test_job_info_is_the_one_written_before() -> None:
    j = job()
    same_json(
        j.info().dump(),
        {"id": "job-2", "state": "queued", "origin": "tcp:ci", "completion_tokens": 7, "error": None},
    )
    j.state, j.error = JobState.FAILED, QueueFull("full", retry_after_s=1)
    assert j.info().dump()["error"] == QueueFull("full", retry_after_s=1).to_dict()["error"]


def snapshot(cache: CacheStats | None) -> EngineSnapshot:
    window = {"window_s": 60, "jobs_done": 1, "decode_tokens_per_s_p50": 12.5, "tokens_per_s": None}
    return EngineSnapshot(
        state=EngineState.READY,
        backend="llamacpp",
        model="smollm2",
        n_ctx=2048,
        fallback_reasons=["rkllm: no NPU"],
        load_error=None,
        backend_details={},
        slots=SlotsInfo(total=4, effective=3, active=1),
        queue_depth=2,
        queue_max_depth=16,
        running=[job().info()],
        counters={"done": 1, "failed": 0},
        totals={"prompt_tokens": 10, "queue_wait_ms": 0.5},
        thermal={"paused": False, "derate_pause_ms": 0.0},
        last_job={
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        },
        throughput={"1m": window},
        prefix_cache=cache,
        started_wall=0.0,
        structured_output={"available": True, "reason": None, "schema_cache": {"hits": 0}},
    )


@pytest.mark.parametrize("cache", [None, CacheStats(lookups=3, hits=1, saved_prefill_ms=2.5, notes=["x"])])
def test_the_engine_status_is_the_one_written_before(cache: CacheStats | None) -> None:
    snap = snapshot(cache)
    old = {
        "state": snap.state.value,
        "backend": snap.backend,
        "fallback_reasons": list(snap.fallback_reasons),
        "load_error": snap.load_error,
        "slots": dataclasses.asdict(snap.slots),
        "queue": {"depth": snap.queue_depth, "max_depth": snap.queue_max_depth},
        "running": [j.dump() for j in snap.running],
        "jobs": dict(snap.counters),
        "totals": dict(snap.totals),
        "thermal": snap.thermal,
        "prefix_cache": dataclasses.asdict(cache) if cache is not None else None,
        "structured_output": snap.structured_output,
        "last_job": snap.last_job,
        "throughput": snap.throughput,
    }
    same_json(snap.status(), old)


def test_the_wire_prefix_cache_has_every_counter_of_cache_stats() -> None:
    assert list(PrefixCache.model_fields) == [f.name for f in dataclasses.fields(CacheStats)]
    assert list(CacheSummary.model_fields) == list(CACHE_SUMMARY), "telemetry's subset, in its order"


# -- lenient ---------------------------------------------------------------------------------------


def test_lenient_leaves_out_each_field_of_a_wrong_type_and_counts_them() -> None:
    doc = {
        "device_id": "a",
        "board": ["Pi"],
        "slots": True,
        "interval_s": float("nan"),
        "version": "1.0",
        "newer_field": {"x": 1},
    }
    presence, dropped = lenient(Presence, doc)
    assert (presence.device_id, presence.board, presence.slots, presence.interval_s) == (
        "a",
        None,
        None,
        None,
    )
    assert presence.version == "1.0" and dropped == 3
    assert doc["board"] == ["Pi"], "the caller's document is not edited"


def test_lenient_drops_bad_items_of_lists_and_maps_but_keeps_the_good_ones() -> None:
    doc = {
        "schema": 1,
        "queue": {"depth": 1.5, "max_depth": 4},
        "summary": {"window": 60, "throttled": "yes", "ttft_ms_p50": 80},
        "jobs": {"done": 3, "failed": "2", "cancelled": -0.0},
        "thermals": {"zones": [{"type": "soc", "temp_c": "hot"}, {"type": 5, "temp_c": 50}]},
        "histograms": {"edged_ttft_seconds": {"buckets": [["0.1", 1], ["+Inf", "2"]], "sum": 0.5}},
    }
    report, dropped = lenient(TelemetryReport, doc)
    assert report.queue.depth is None and report.queue.max_depth == 4
    assert (report.summary.window, report.summary.throttled, report.summary.ttft_ms_p50) == (None, None, 80)
    assert report.jobs == {"done": 3}
    assert report.thermals is not None and report.thermals.zones is not None
    assert [(z.type, z.temp_c) for z in report.thermals.zones] == [("soc", None), (None, 50)]
    assert report.histograms is not None
    assert report.histograms["edged_ttft_seconds"].buckets == [("0.1", 1)]
    assert dropped == 9, "the bucket's bad count, then the pair it left incomplete"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"queue": [1, 2]}, "'queue' is not an object"),
        ({"queue": None}, "'queue' is not an object"),
        ({"thermals": {"zones": {"soc": 50}}}, "'thermals.zones' is not a list"),
        ({"thermals": {"zones": [50.0]}}, "a thermal zone is not an object"),
        ({"thermals": []}, "'thermals' is not an object"),
    ],
)
def test_lenient_refuses_a_wrong_shape_where_the_reader_relies_on_it(
    changes: dict[str, Any], reason: str
) -> None:
    doc = {"schema": 1, "queue": {}, "summary": {}, **changes}
    shapes = {"queue", "summary", "thermals", "thermals.zones", "thermals.zones.*"}
    with pytest.raises(Unreadable, match=f"^{reason}$"):
        lenient(TelemetryReport, doc, shapes=shapes)
    if "queue" not in changes:  # without shapes, an optional part of a wrong shape is left out
        report, dropped = lenient(TelemetryReport, doc)
        assert dropped == 1 and (report.thermals is None or report.thermals.zones in (None, []))


def test_lenient_refuses_a_missing_required_field_and_a_non_object() -> None:
    with pytest.raises(Unreadable, match="'summary' is missing"):
        lenient(TelemetryReport, {"schema": 1, "queue": {}})
    with pytest.raises(Unreadable, match="not a JSON object"):
        lenient(TelemetryReport, [1])

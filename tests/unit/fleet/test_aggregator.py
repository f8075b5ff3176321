"""`Aggregator.handle`: how a device's status and telemetry documents are read into its state - which
fields, which zone is the hottest, what a value of the wrong type becomes, which topics are ours, and
how the telemetry interval is judged (fake clock, no broker)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from edged.fleet.aggregator import MAX_INTERVAL_S, MIN_INTERVAL_S, Aggregator, FleetEvent


class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_800_000_000.0 + self.t


def telemetry(**changes: Any) -> bytes:
    """The parts of an edged.telemetry.report document the aggregator reads."""
    doc: dict[str, Any] = {
        "schema": 1,
        "backend": "llamacpp",
        "model": "smollm2",
        "version": "0.1.0",
        "state": "ready",
        "queue": {"depth": 2, "max_depth": 16},
        "slots": {"total": 4},
        "jobs": {"done": 11},
        "summary": {
            "window": "1m",
            "decode_tokens_per_s": 18.5,
            "tokens_per_s": 30.0,
            "s_per_1k_tokens": 54.05,
            "ttft_ms_p50": 120.0,
            "throttled": False,
            "thermal_state": "warm",
        },
        "thermals": {
            "zones": [
                {"zone": "thermal_zone0", "type": "soc-thermal", "temp_c": 51.0},
                {"zone": "thermal_zone1", "type": "bigcore0-thermal", "temp_c": 63.5},
                {"zone": "thermal_zone2", "temp_c": 40.0},
            ],
            "governor": {"state": "normal", "hottest_zone": "soc-thermal"},
        },
    }
    for key, value in changes.items():
        doc[key] = value
    return json.dumps(doc).encode()


def status(**fields: Any) -> bytes:
    return json.dumps({"state": "online", **fields}).encode()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agg(clock: Clock) -> Aggregator:
    return Aggregator(clock=clock, wall=clock.wall)


def test_status_and_telemetry_fill_the_devices_state(agg: Aggregator, clock: Clock) -> None:
    agg.handle(
        "edged/rock/status",
        status(board="Radxa ROCK 5B", soc="rockchip,rk3588", profile="rk3588", backend="rkllm", slots=1),
    )
    agg.handle("edged/rock/telemetry", telemetry())
    d = agg.device("rock")
    assert d is not None
    assert (d.board, d.soc, d.profile) == ("Radxa ROCK 5B", "rockchip,rk3588", "rk3588")
    assert (d.backend, d.model, d.version, d.slots) == ("llamacpp", "smollm2", "0.1.0", 4), "telemetry wins"
    assert (d.engine_state, d.queue_depth, d.queue_max_depth, d.jobs_done) == ("ready", 2, 16, 11)
    assert (d.decode_tok_s, d.tokens_per_s, d.s_per_1k_tokens, d.ttft_ms_p50) == (18.5, 30.0, 54.05, 120.0)
    assert (d.window, d.throttled, d.governor) == ("1m", False, "warm")
    assert (d.hottest_c, d.hottest_zone) == (63.5, "bigcore0-thermal"), "the hottest zone, by its type"
    assert (d.last_seen, d.last_seen_s, d.reports, d.last_status) == (clock.wall(), 0.0, 1, "online")


def test_the_hottest_zone_falls_back_to_the_summary_and_the_zone_name(agg: Aggregator) -> None:
    agg.handle("edged/a/telemetry", telemetry(thermals={"zones": [{"zone": "thermal_zone3", "temp_c": 70}]}))
    a = agg.device("a")
    assert a is not None and (a.hottest_c, a.hottest_zone) == (70.0, "thermal_zone3")
    no_readings = {"zones": [{"type": "soc-thermal", "temp_c": None}], "governor": {"hottest_zone": "cpu"}}
    summary = {"hottest_c": 44.0, "thermal_state": None}
    agg.handle("edged/b/telemetry", telemetry(thermals=no_readings, summary=summary))
    b = agg.device("b")
    assert b is not None and (b.hottest_c, b.hottest_zone, b.decode_tok_s) == (44.0, "cpu", None)
    agg.handle("edged/c/telemetry", telemetry(thermals={"governor": {"state": "derate"}}, summary={}))
    c = agg.device("c")
    assert c is not None and (c.hottest_c, c.hottest_zone, c.governor) == (None, None, "derate")


def test_a_value_of_the_wrong_type_is_left_out_not_fatal(agg: Aggregator) -> None:
    summary = {
        "decode_tokens_per_s": True,  # a boolean is no number
        "tokens_per_s": "fast",
        "s_per_1k_tokens": float("nan"),  # json.dumps writes NaN; json.loads reads it back
        "ttft_ms_p50": float("inf"),
        "throttled": "yes",
        "window": 60,
    }
    doc = telemetry(
        summary=summary,
        queue={"depth": 1.5, "max_depth": True},
        slots={"total": "4"},
        jobs={"done": -0.0},
        backend=7,
        thermals={"zones": [{"type": "soc-thermal", "temp_c": "hot"}, {"type": 5, "temp_c": 50}]},
    )
    agg.handle("edged/odd/telemetry", doc)
    d = agg.device("odd")
    assert d is not None and agg.counters()["malformed"] == 0
    assert (d.decode_tok_s, d.tokens_per_s, d.s_per_1k_tokens, d.ttft_ms_p50) == (None, None, None, None)
    assert (d.throttled, d.window, d.queue_depth, d.queue_max_depth) == (None, None, None, None)
    assert (d.slots, d.jobs_done, d.backend) == (None, None, None)
    assert (d.hottest_c, d.hottest_zone) == (50.0, None)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"queue": [1, 2]}, "'queue' is not an object"),
        ({"thermals": {"zones": {"soc": 50}}}, "'thermals.zones' is not a list"),
        ({"thermals": {"zones": [50.0]}}, "a thermal zone is not an object"),
        ({"thermals": []}, "'thermals' is not an object"),
    ],
)
def test_a_document_of_the_wrong_shape_is_malformed(agg: Aggregator, changes: dict, reason: str) -> None:
    agg.handle("edged/x/telemetry", telemetry(**changes))
    assert agg.device("x") is None and agg.counters()["malformed"] == 1
    assert agg.problems()[-1]["reason"] == reason


def test_status_fields_of_the_wrong_type_are_left_out(agg: Aggregator) -> None:
    agg.handle("edged/s/status", status(board=["Pi"], slots=True, interval_s="60"))
    s = agg.device("s")
    assert s is not None and (s.board, s.slots, s.interval_s) == (None, None, 10.0)
    agg.handle("edged/t/status", json.dumps({"board": "no state"}).encode())
    assert agg.device("t") is None and agg.counters()["malformed"] == 1


def test_only_the_prefixs_device_topics_are_read(clock: Clock) -> None:
    agg = Aggregator(prefix="site/edged/", clock=clock, wall=clock.wall)
    assert agg.topics == ["site/edged/+/status", "site/edged/+/telemetry"]
    agg.handle("site/edged/pi/telemetry", telemetry())
    for topic in (
        "edged/pi/telemetry",
        "site/edged/telemetry",
        "site/edged/pi/results",
        "site/edgedx/pi/status",
    ):
        agg.handle(topic, telemetry())
    counts = agg.counters()
    assert (counts["devices"], counts["messages"], counts["ignored"], counts["telemetry"]) == (1, 5, 4, 1)


def test_event_reports_do_not_count_as_intervals(agg: Aggregator, clock: Clock) -> None:
    for step, event in [(0, None), (5, None), (6, "thermal"), (10, None), (15, None)]:
        clock.t = 5000.0 + step
        agg.handle("edged/e/telemetry", telemetry(**({"event": event} if event else {})))
    e = agg.device("e")
    assert e is not None and e.interval_s == 5.0 and e.reports == 5


def test_an_announced_interval_is_kept_within_bounds(agg: Aggregator) -> None:
    agg.handle("edged/fast/status", status(interval_s=0.001))
    agg.handle("edged/slow/telemetry", telemetry(interval_s=1e9))
    fast, slow = agg.device("fast"), agg.device("slow")
    assert fast is not None and fast.interval_s == MIN_INTERVAL_S
    assert slow is not None and slow.interval_s == MAX_INTERVAL_S


def test_clearing_the_status_of_a_device_never_seen_changes_nothing(agg: Aggregator) -> None:
    events: list[FleetEvent] = []
    agg.subscribe(events.append)
    agg.handle("edged/ghost/status", b"")
    assert events == [] and agg.device("ghost") is None and agg.counters()["malformed"] == 0


def test_every_message_is_told_to_the_listeners_and_a_failing_listener_is_counted(agg: Aggregator) -> None:
    seen: list[str] = []

    def broken(_event: FleetEvent) -> None:
        raise RuntimeError("listener bug")

    agg.subscribe(broken)
    unsubscribe = agg.subscribe(lambda e: seen.append(f"{e.kind}:{e.device_id}"))
    with capture_logs() as logs:
        agg.handle("edged/a/status", status())
        agg.handle("edged/a/telemetry", telemetry())
    assert seen == ["state:a", "status:a", "telemetry:a"]
    assert agg.counters()["listener_errors"] == 3
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["fleet listener failed"] * 3
    unsubscribe()
    agg.handle("edged/a/telemetry", telemetry())
    assert len(seen) == 3


def test_a_newer_edgeds_report_is_read_by_the_fields_it_shares(agg: Aggregator) -> None:
    """Fields this aggregator does not know are ignored; a whole-number figure reads as a float."""
    summary = {"window": "1m", "decode_tokens_per_s": 18, "hottest_c": 51, "gpu_load": {"x": [1]}}
    agg.handle(
        "edged/new/telemetry", telemetry(summary=summary, thermals=None, accelerators=[{"kind": "tpu"}])
    )
    d = agg.device("new")
    assert d is not None and agg.counters()["malformed"] == 0
    assert (d.decode_tok_s, d.hottest_c, d.window) == (18.0, 51.0, "1m")
    assert isinstance(d.decode_tok_s, float) and isinstance(d.hottest_c, float)
    agg.handle("edged/new/status", status(interval_s=30, api_level=2))
    d = agg.device("new")
    assert d is not None and d.interval_s == 30.0 and d.last_status == "online"

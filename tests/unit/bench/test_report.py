"""The bench's report: the start-up figures (medians, edged against raw and llama-server) and their row
in the table, with the llama-server column the bench's own tests cannot start (no binary there)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from edged.bench.report import (
    STARTUP,
    BenchReport,
    Figure,
    MachineInfo,
    ModelInfo,
    TargetInfo,
    WorkloadResult,
    paired_ratios,
    render_table,
    summarise,
    summarise_startup,
)

STARTS = {"edged": [2.5, 2.3, 9.0], "raw": [0.4, 0.5, 0.45], "llama-server": [2.0, 2.1, 1.9]}


def test_startup_is_the_median_of_the_starts_and_edged_against_the_others() -> None:
    startup = summarise_startup(STARTS)
    edged = startup.figures["edged"]
    assert (edged.median, edged.n, edged.values) == (2.5, 3, [2.5, 2.3, 9.0])  # the slow start is seen
    assert edged.mean == pytest.approx(13.8 / 3)  # ... and moves the mean, not the median
    assert startup.ratios == {
        "edged/raw": pytest.approx(2.5 / 0.45),
        "edged/llama-server": pytest.approx(2.5 / 2.0),
    }
    assert startup.differences_s == {
        "edged/raw": pytest.approx(2.05),
        "edged/llama-server": pytest.approx(0.5),
    }


def test_startup_without_llama_server_compares_with_raw_only() -> None:
    startup = summarise_startup({"edged": [1.0], "raw": [0.5]})
    assert set(startup.figures) == {"edged", "raw"}
    assert startup.figures["edged"].std is None
    assert startup.ratios == {"edged/raw": 2.0}
    assert set(startup.differences_s) == {"edged/raw"}


def report(starts: dict[str, list[float]]) -> BenchReport:
    seeds = WorkloadResult(
        name="seeds",
        summary="",
        generated_tokens_per_job=8,
        jobs_per_run=1,
        figures={t: {"ttft_ms": Figure.of([100.0, 120.0])} for t in starts},
        ratios={"edged/raw": {"ttft_ms": 1.0}},
    )
    return BenchReport(
        machine=MachineInfo(
            cpu_model="cpu",
            cores=2,
            cores_available=2,
            platform="linux",
            python="3.11",
            llama_cpp_python="0.3.36",
            edged="0",
        ),
        model=ModelInfo(path="/m.gguf", name="m.gguf", size_bytes=10**9),
        threads=2,
        runs=3,
        concurrency=1,
        slots=None,
        targets=[TargetInfo(name=t, notes=[]) for t in starts],
        startup=summarise_startup(starts),
        workloads=[seeds],
        definitions={STARTUP.key: STARTUP.meaning},
    )


def rows(text: str) -> dict[str, list[str]]:
    """The table's rows by their figure label: the cells after it."""
    found = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│┃").split("│")]
        if len(cells) > 2:
            found[cells[1]] = cells[2:]
    return found


def test_the_table_has_a_startup_row_beside_llama_server() -> None:
    console = Console(record=True, width=200)
    render_table(report(STARTS), console)
    text = console.export_text()
    startup = rows(text)[STARTUP.label]
    # edged, raw, llama-server: median (min-max); then edged/raw, edged/llama-server of the medians
    assert startup == ["2.50 (2.30-9.00)", "0.45 (0.40-0.50)", "2.00 (1.90-2.10)", "5.556", "1.250"]
    assert "startup: edged - llama-server = +0.50 s (medians of 3 starts each)" in text
    assert text.index(STARTUP.label) < text.index("TTFT ms")  # first, before the workloads


def test_the_table_without_llama_server_has_no_difference_line() -> None:
    console = Console(record=True, width=200)
    render_table(report({"edged": [3.0], "raw": [0.5]}), console)
    text = console.export_text()
    assert rows(text)[STARTUP.label] == ["3.00", "0.50", "6.000"]
    assert "llama-server" not in text


def test_the_json_document_carries_the_startup_figures() -> None:
    doc = BenchReport.model_validate_json(report(STARTS).model_dump_json())
    assert doc.startup is not None
    assert doc.startup.figures["llama-server"].median == 2.0
    assert doc.definitions[STARTUP.key] == STARTUP.meaning


# -- the tools workload: medians, valid-call counts, ratios run by run over the valid runs ------------------

MB = {"rss_anon_mb": 200.0}
TOOL_RUNS = {
    # run 1: both valid; run 2: edged's call invalid (no call_s), both answered; run 3: llama-server refused
    "edged": [
        {"call_valid": 1.0, "call_s": 2.0, "completion_tokens": 40.0, "call_tok_s": 20.0, **MB},
        {"call_valid": 0.0, "completion_tokens": 60.0, "call_tok_s": 15.0, **MB},
        {"call_valid": 1.0, "call_s": 3.0, "completion_tokens": 50.0, "call_tok_s": 16.0, **MB},
    ],
    "raw": [{"rss_anon_mb": 100.0}] * 3,  # raw runs no tool call: only its memory is sampled
    "llama-server": [
        {"call_valid": 1.0, "call_s": 4.0, "completion_tokens": 80.0, "call_tok_s": 20.0, **MB},
        {"call_valid": 1.0, "call_s": 5.0, "completion_tokens": 100.0, "call_tok_s": 20.0, **MB},
        {"call_valid": 0.0, **MB},
    ],
}


def test_tool_ratios_are_run_by_run_and_the_seconds_only_of_valid_calls() -> None:
    paired = paired_ratios(TOOL_RUNS)
    assert set(paired) == {"edged/llama-server"}  # raw ran nothing: no edged/raw ratio, not even of memory
    pair = paired["edged/llama-server"]
    assert pair["call_s"].values == [0.5]  # run 1 only: the other runs have an invalid call
    assert pair["completion_tokens"].values == [0.5, 0.6]  # the runs both answered
    assert pair["call_tok_s"].values == [1.0, 0.75]
    assert pair["rss_anon_mb"].values == [1.0, 1.0, 1.0]
    assert "call_valid" not in pair
    _, ratios = summarise(TOOL_RUNS)
    assert "call_valid" not in ratios["edged/llama-server"]  # a count has no ratio


def tools_report() -> BenchReport:
    figures, ratios = summarise(TOOL_RUNS)
    tools = WorkloadResult(
        name="tools",
        summary="",
        generated_tokens_per_job=256,
        jobs_per_run=1,
        figures=figures,
        ratios=ratios,
        paired_ratios=paired_ratios(TOOL_RUNS),
        notes=["edged, run 2: invalid call: set_light: 928 is greater than the maximum of 100"],
    )
    doc = report({"edged": [1.0], "raw": [0.5], "llama-server": [1.0]})
    doc.workloads = [tools]
    return doc


def test_the_table_shows_tool_calls_as_medians_counts_and_paired_ratios() -> None:
    console = Console(record=True, width=250)
    render_table(tools_report(), console)
    text = console.export_text()
    found = rows(text)
    # edged, raw, llama-server, edged/raw, edged/llama-server
    assert found["valid calls"] == ["2/3", "-", "2/3", "-", "-"]
    seconds = ["2.50 (2.00-3.00)", "-", "4.50 (4.00-5.00)", "-", "0.500"]
    assert found["s to the call, median (min-max)"] == seconds
    assert found["completion tokens, median (min-max)"] == [
        "50.0 (40.0-60.0)",
        "-",
        "90.0 (80.0-100.0)",
        "-",
        "0.550 (0.500-0.600)",
    ]
    assert "tools: edged, run 2: invalid call: set_light: 928 is greater than the maximum of 100" in text


def test_a_tool_ratio_is_never_one_of_means_over_invalid_calls() -> None:
    doc = tools_report()
    doc.workloads[0].paired_ratios = {}  # as when no run had two valid calls
    console = Console(record=True, width=250)
    render_table(doc, console)
    assert rows(console.export_text())["s to the call, median (min-max)"][-1] == "-"


def test_a_document_of_before_the_tools_workload_still_reads() -> None:
    old = json.loads(report(STARTS).model_dump_json())
    for workload in old["workloads"]:
        del workload["paired_ratios"], workload["notes"]
    doc = BenchReport.model_validate(old)
    assert doc.workloads[0].paired_ratios == {} and doc.workloads[0].notes == []

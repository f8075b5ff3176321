"""The bench's report: the start-up figures (medians, edged against raw and llama-server) and their row
in the table, with the llama-server column the bench's own tests cannot start (no binary there)."""

from __future__ import annotations

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
    render_table,
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

"""`edged`'s command group: `bench` and `fleet` are imported only when one of them runs or `--help`
lists them (tests/test_startup.py checks what `edged serve` imports), and still behave as commands
of `edged` in every other way."""

from __future__ import annotations

from typer.testing import CliRunner

from edged.cli import app


def test_help_lists_every_command_in_order() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    names = ["serve", "ask", "status", "jobs", "board", "config", "bench", "fleet"]
    rows = [line.split()[1] for line in result.output.splitlines() if line.startswith("│ ")]
    assert rows[-len(names) :] == names, result.output


def test_the_lazy_commands_run_with_their_own_options() -> None:
    result = CliRunner().invoke(app, ["bench", "synth-model", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--layers" in result.output
    result = CliRunner().invoke(app, ["fleet", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--topic-prefix" in result.output


def test_a_mistyped_command_is_suggested_among_the_lazy_ones_too() -> None:
    for typo, meant in (("flet", "fleet"), ("bnch", "bench"), ("serv", "serve")):
        result = CliRunner().invoke(app, [typo], env={"COLUMNS": "200"})
        assert result.exit_code == 2, result.output
        assert f"Did you mean '{meant}'?" in result.output, result.output

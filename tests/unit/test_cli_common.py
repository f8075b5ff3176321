"""edged/cli_common.py: the exit codes both commands document, and the error lines they print."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from edged import cli_common
from edged.cli_common import fail, load_settings_or_exit


def test_the_exit_codes_are_those_of_the_readme() -> None:
    codes = (
        cli_common.EXIT_OK,
        cli_common.EXIT_DAEMON_ERROR,
        cli_common.EXIT_USAGE,
        cli_common.EXIT_UNREACHABLE,
        cli_common.EXIT_CONFIG,
    )
    assert codes == (0, 1, 2, 3, 78)


def test_fail_prints_the_message_as_text_not_markup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as exited:
        fail(cli_common.EXIT_UNREACHABLE, "broker [::1]:1883 said [bold]no[/bold]", program="edged fleet")
    assert exited.value.exit_code == 3
    assert capsys.readouterr().err == "edged fleet: broker [::1]:1883 said [bold]no[/bold]\n"


def test_a_bad_configuration_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as exited:
        load_settings_or_exit(tmp_path / "missing.toml")
    assert exited.value.exit_code == 78
    assert capsys.readouterr().err.startswith("edged: config error: ")

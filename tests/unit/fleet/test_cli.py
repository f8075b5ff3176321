"""`edged fleet` and `edged fleet serve` parsed in-process (Typer's CliRunner): the options that locate
the fleet (broker options, --config, --topic-prefix, --interval) go before or after `serve`, and the
one after wins. The web server's bind and the broker connection are replaced, so nothing listens or
connects: the test reads the options `serve` resolved and stops there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import edged.fleet.cli as fleet_cli
import edged.fleet.web as fleet_web
from edged.cli import app
from edged.mqtt.client import BrokerUnreachable

SHARED = [
    "--config",
    "--mqtt",
    "--username",
    "--password",
    "--tls",
    "--no-tls",
    "--tls-ca",
    "--tls-cert",
    "--tls-key",
    "--tls-verify",
    "--protocol",
    "--topic-prefix",
    "--interval",
]


class FakeSocket:
    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _keep_structlog(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `edged fleet` callback (which runs before `serve --help` too) points structlog at stderr,
    here CliRunner's, closed after the test: every later test's log line would fail."""
    monkeypatch.setattr(fleet_cli, "_logs_to_stderr", lambda: None)


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``fleet(*args)``: `edged fleet --config EMPTY *args` in-process; returns (result, the resolved
    `FleetOptions` or None when `serve` stopped before it would connect)."""
    for name in list(os.environ):
        if name.upper().startswith("EDGED_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "edged.toml"
    empty.write_text("")
    monkeypatch.setattr(fleet_web, "bind", lambda host, port: FakeSocket())
    resolved: list[fleet_cli.FleetOptions] = []

    def monitor(self: fleet_cli.FleetOptions, aggregator: Any = None) -> Any:
        resolved.append(self)
        raise BrokerUnreachable("stopped before connecting")

    monkeypatch.setattr(fleet_cli.FleetOptions, "monitor", monitor)

    def run(*args: str) -> tuple[Any, fleet_cli.FleetOptions | None]:
        resolved.clear()
        result = CliRunner().invoke(app, ["fleet", "--config", str(empty), *args])
        return result, (resolved[-1] if resolved else None)

    return run


@pytest.mark.parametrize("command", [["fleet"], ["fleet", "serve"]])
def test_help_lists_the_options_that_locate_the_fleet(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    missing = [option for option in SHARED if option not in result.output]
    assert not missing, result.output


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--mqtt", "broker.lan:1884"],  # after the subcommand: "no broker" before this fix
        ["--mqtt", "broker.lan:1884", "serve"],  # before it, as it always worked
    ],
)
def test_the_broker_goes_before_or_after_serve(fleet: Any, args: list[str]) -> None:
    result, options = fleet(*args)
    assert result.exit_code == 3 and "stopped before connecting" in result.output, result.output
    assert options is not None
    assert (options.broker.host, options.broker.port) == ("broker.lan", 1884)


def test_given_in_both_places_the_one_after_serve_wins(fleet: Any) -> None:
    result, options = fleet(
        *("--mqtt", "before.lan", "--username", "group-user", "--topic-prefix", "before", "--interval", "5"),
        *("serve", "--mqtt", "[::1]:1885", "--topic-prefix", "after", "--listen", "127.0.0.1:9"),
    )
    assert result.exit_code == 3, result.output
    assert options is not None
    assert (options.broker.host, options.broker.port, options.topic_prefix) == ("::1", 1885, "after")
    # Given only before `serve`: still taken.
    assert (options.broker.username, options.interval_s) == ("group-user", 5.0)


def test_a_bad_value_before_serve_is_overridden_after_it_and_not_the_other_way(fleet: Any) -> None:
    result, options = fleet("--mqtt", "[::1", "serve", "--mqtt", "broker.lan")
    assert result.exit_code == 3 and options is not None and options.broker.host == "broker.lan"
    result, options = fleet("--mqtt", "broker.lan", "serve", "--mqtt", "[::1")
    assert result.exit_code == 2 and "bracket" in result.output and options is None, result.output


def test_no_broker_anywhere_is_a_usage_error(fleet: Any) -> None:
    result, options = fleet("serve")
    assert result.exit_code == 2 and "no broker" in result.output and options is None, result.output

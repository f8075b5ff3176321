"""What `edged` (edged/cli.py) and `edged fleet` (edged/fleet/cli.py) share, which cannot import each
other (edged/cli.py mounts the fleet commands): the exit codes, the two consoles, `fail` and
`load_settings_or_exit`, and the option types, among them the broker options of every command that
talks to a broker (`edged ask --mqtt`, `edged fleet`, `edged fleet serve`) and `broker_options`,
which resolves them.

Nothing heavy loads here: the configuration and paho load when a command runs, so `edged --help`
stays quick.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from edged.errors import ConfigError

if TYPE_CHECKING:
    from edged.config import MqttConfig, Settings
    from edged.mqtt.broker import BrokerOptions

EXIT_OK, EXIT_DAEMON_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_CONFIG = 0, 1, 2, 3, 78
"""0 ok, 1 the daemon answered with an error, 2 usage, 3 daemon or broker not reachable, 78 bad
configuration (EX_CONFIG; systemd's RestartPreventExitStatus)."""

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(code: int, message: str, program: str = "edged") -> NoReturn:
    """``PROGRAM: MESSAGE`` on stderr (the message is text, never markup), then exit ``code``."""
    err.print(f"[red]{program}:[/red] {escape(message)}", markup=True)
    raise typer.Exit(code)


def exit_config_error(exc: ConfigError) -> NoReturn:
    """One ``edged: config error: ...`` line per problem on stderr, then exit 78."""
    for problem in exc.problems:
        err.print(f"[red]edged: config error:[/red] {escape(str(problem))}", markup=True)
    raise typer.Exit(EXIT_CONFIG) from exc


def load_settings_or_exit(config: Path | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """`edged.config.load_settings`, or exit 78 naming every problem."""
    from edged.config import load_settings

    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        exit_config_error(exc)


# -- options ---------------------------------------------------------------------------------------

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (default: /etc/edged/edged.toml if it exists).",
        dir_okay=False,
    ),
]
SocketOpt = Annotated[
    Path | None, typer.Option("--socket", "-s", help="Daemon socket (default: socket.path from the config).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

# The broker options: the same flags wherever edged talks to a broker. A command declares the
# parameters with these types (all default to None: "not given") and passes them to `broker_options`.

BrokerOpt = Annotated[
    str | None,
    typer.Option(
        "--mqtt",
        metavar="HOST[:PORT]",
        help="The broker: HOST, HOST:PORT, [IPV6]:PORT (default: mqtt.host and mqtt.port).",
    ),
]
UsernameOpt = Annotated[str | None, typer.Option(help="Broker user name (default: mqtt.username).")]
PasswordOpt = Annotated[
    str | None,
    typer.Option(
        help="Broker password (default: mqtt.password). Prefer the environment variable "
        "EDGED_MQTT__PASSWORD or the configuration file: the command line shows in ps."
    ),
]
TlsOpt = Annotated[
    bool | None,
    typer.Option("--tls/--no-tls", help="Use TLS (default: on with a CA or client certificate)."),
]
TlsCaOpt = Annotated[
    Path | None, typer.Option(help="CA certificate of the broker (default: mqtt.tls.ca).", dir_okay=False)
]
TlsCertOpt = Annotated[Path | None, typer.Option(help="Client certificate (with --tls-key).", dir_okay=False)]
TlsKeyOpt = Annotated[Path | None, typer.Option(help="Client private key (with --tls-cert).", dir_okay=False)]
TlsVerifyOpt = Annotated[
    bool | None,
    typer.Option("--tls-verify/--no-tls-verify", help="Verify the broker's certificate and host name."),
]
ProtocolOpt = Annotated[
    str | None, typer.Option(help="MQTT protocol, 5 or 3.1.1 (default: mqtt.protocol, 5).")
]


def broker_options(
    cfg: MqttConfig,
    mqtt: str | None,
    username: str | None = None,
    password: str | None = None,
    tls: bool | None = None,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_verify: bool | None = None,
    protocol: str | None = None,
) -> BrokerOptions:
    """The ``mqtt.*`` settings overridden by the broker options that were given (not None); raises
    `edged.mqtt.broker.BrokerSetupError` (a usage error, exit 2)."""
    from edged.mqtt.broker import BrokerOptions, BrokerSetupError

    if protocol is not None and protocol not in ("5", "3.1.1"):
        raise BrokerSetupError(f"--protocol must be 5 or 3.1.1, not {protocol!r}")
    overrides = {
        "username": username,
        "password": password,
        "tls": tls,
        "ca": tls_ca,
        "cert": tls_cert,
        "key": tls_key,
        "verify": tls_verify,
        "protocol": protocol,
    }
    return BrokerOptions.from_config(cfg, mqtt, overrides)

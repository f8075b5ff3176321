"""`edged fleet`: the whole fleet from any machine that reaches the broker.

``edged fleet --mqtt HOST[:PORT]`` shows a live table (the callback runs when no subcommand is
given); ``--once`` prints one table, ``--json`` one JSON snapshot for scripts. The broker options
(edged/cli_common.py) are those of the shared client factory (`edged.mqtt.broker.BrokerOptions`)
and default to the ``mqtt.*`` settings, like `edged ask --mqtt`.

A subcommand takes the options that locate the fleet (--config, the broker options, --topic-prefix,
--interval) both before and after its name: ``edged fleet --mqtt HOST serve`` and
``edged fleet serve --mqtt HOST`` are the same, and one given in both places is taken from after.
edged/cli.py mounts `fleet_app` as ``edged fleet``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from edged.cli_common import (
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    BrokerOpt,
    ConfigOpt,
    PasswordOpt,
    ProtocolOpt,
    TlsCaOpt,
    TlsCertOpt,
    TlsKeyOpt,
    TlsOpt,
    TlsVerifyOpt,
    UsernameOpt,
    broker_options,
    err,
    fail,
    load_settings_or_exit,
    out,
)

if TYPE_CHECKING:  # imported when the command runs: `edged --help` and the others stay quick
    from edged.fleet.aggregator import Aggregator, FleetMonitor
    from edged.mqtt.broker import BrokerOptions

WIDE = 240
"""Columns for a table printed into a pipe or a file."""
SETTLE_S = 0.5
"""--once: after the subscription, how long retained statuses may take before an early finish."""

_fail = partial(fail, program="edged fleet")

HELP = "\n\n".join(
    (
        "Watch every edged device on a broker: a live table, one row per device, worst first "
        "(offline, stale, throttled, hottest).",
        "It subscribes to PREFIX/+/status (retained; the Last Will says offline) and PREFIX/+/telemetry. "
        "A device is stale when its telemetry stops for 3 intervals, offline on its retained offline "
        "status or its will. The broker options default to the mqtt.* settings of the configuration, "
        "as for `edged ask --mqtt`.",
        "Examples:",
        "edged fleet --mqtt broker.lan   (live table; Ctrl-C quits)",
        'EDGED_MQTT__PASSWORD="$(cat ~/.config/edged/broker-pass)" edged fleet --mqtt \\[fd00::5]:8883 '
        "--tls-ca ca.crt --username dashboard   (the password from the environment: a --password "
        "on the command line is visible to every local user in ps)",
        "edged fleet --mqtt broker.lan --once --json | jq '.devices[] | select(.state != \"online\")'",
        "edged fleet --once --wait 30 --interval 10   (mqtt.host from /etc/edged/edged.toml)",
        "Exit codes: 0 ok, 2 usage, 3 broker not reachable (or it refused the login or the "
        "subscription), 78 bad configuration.",
    )
)

fleet_app = typer.Typer(help=HELP, add_completion=False, no_args_is_help=False)

TopicPrefixOpt = Annotated[
    str | None, typer.Option(help="First topic level(s) (default: mqtt.topic_prefix, edged).")
]
IntervalOpt = Annotated[
    float | None,
    typer.Option(
        min=0.2,
        help="The devices' telemetry interval in seconds, used until their reports show it "
        "(default: telemetry.interval_s, 10).",
    ),
]


@dataclass(frozen=True)
class FleetOptions:
    """The resolved options of `edged fleet` and its subcommands (`fleet_options`)."""

    broker: BrokerOptions
    topic_prefix: str
    interval_s: float

    def aggregator(self, **kwargs: Any) -> Aggregator:
        from edged.fleet.aggregator import Aggregator

        return Aggregator(prefix=self.topic_prefix, default_interval_s=self.interval_s, **kwargs)

    def monitor(self, aggregator: Aggregator | None = None) -> FleetMonitor:
        """Not started: ``with options.monitor().start() as monitor: ...`` (raises BrokerUnreachable)."""
        from edged.fleet.aggregator import FleetMonitor

        return FleetMonitor(self.broker, aggregator or self.aggregator())


def fleet_options(ctx: typer.Context) -> FleetOptions:
    """The options that locate the fleet, which `edged fleet` and each subcommand declare with the same
    names and types (None: not given): each one given after the subcommand, else before it (on
    `edged fleet`), else from the configuration. Exits 2 or 78 if they cannot work."""
    from edged.mqtt.broker import BrokerSetupError

    before = ctx.parent.params if ctx.parent is not None else {}

    def given(name: str) -> Any:
        value = ctx.params.get(name)
        return before.get(name) if value is None else value

    settings = load_settings_or_exit(given("config"))
    try:
        broker = broker_options(
            settings.mqtt,
            given("mqtt"),
            username=given("username"),
            password=given("password"),
            tls=given("tls"),
            tls_ca=given("tls_ca"),
            tls_cert=given("tls_cert"),
            tls_key=given("tls_key"),
            tls_verify=given("tls_verify"),
            protocol=given("protocol"),
        )
    except BrokerSetupError as exc:
        _fail(EXIT_USAGE, str(exc))
    prefix = (given("topic_prefix") or settings.mqtt.topic_prefix).strip("/")
    if not prefix or "+" in prefix or "#" in prefix:
        _fail(EXIT_USAGE, "--topic-prefix must be a topic without wildcards")
    return FleetOptions(broker, prefix, given("interval") or settings.telemetry.interval_s)


def _logs_to_stderr() -> None:
    """Warnings and errors only, on stderr: stdout is the table or the JSON."""
    import logging
    import sys

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


@fleet_app.callback(invoke_without_command=True)
def fleet(
    ctx: typer.Context,
    mqtt: BrokerOpt = None,
    config: ConfigOpt = None,
    username: UsernameOpt = None,
    password: PasswordOpt = None,
    tls: TlsOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_verify: TlsVerifyOpt = None,
    protocol: ProtocolOpt = None,
    topic_prefix: TopicPrefixOpt = None,
    interval: IntervalOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Print one table after --wait and exit.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON snapshot (implies --once), for scripts.")
    ] = False,
    wait: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="With --once: longest time to collect retained statuses and one round of telemetry "
            "(default: --interval + 1). It ends sooner once every device not offline has reported.",
        ),
    ] = None,
    refresh: Annotated[float, typer.Option(min=0.1, help="Live table refresh period in seconds.")] = 1.0,
) -> None:
    from edged.mqtt.broker import BrokerSetupError
    from edged.mqtt.client import BrokerUnreachable

    _logs_to_stderr()
    if ctx.invoked_subcommand is not None:
        return  # the subcommand resolves the options, its own first: `edged fleet serve --mqtt HOST`
    options = fleet_options(ctx)
    once = once or as_json
    if wait is not None and not once:
        _fail(EXIT_USAGE, "--wait goes with --once or --json")
    try:
        monitor = options.monitor().start()
    except BrokerSetupError as exc:
        _fail(EXIT_USAGE, str(exc))
    except BrokerUnreachable as exc:
        _fail(EXIT_UNREACHABLE, str(exc))
    with monitor:
        if once:
            _once(options, monitor, options.interval_s + 1 if wait is None else wait, as_json)
        else:
            _live(options, monitor, refresh)


def _once(options: FleetOptions, monitor: FleetMonitor, wait: float, as_json: bool) -> None:
    """Collect for up to ``wait`` seconds (less once every device not offline has reported)."""
    from edged.fleet.view import fleet_document, render_table

    aggregator = monitor.aggregator
    started = time.monotonic()
    pause = threading.Event()
    while (elapsed := time.monotonic() - started) < wait:
        if elapsed >= min(SETTLE_S, wait) and aggregator.reported_since_start():
            break
        pause.wait(min(0.05, wait - elapsed))
    devices = aggregator.snapshot()
    if as_json:
        document = fleet_document(
            devices,
            counters=aggregator.counters(),
            problems=aggregator.problems(),
            broker=options.broker.address,
            topic_prefix=options.topic_prefix,
            collected_s=time.monotonic() - started,
        )
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return
    table = render_table(devices, counters=aggregator.counters(), broker=options.broker.address)
    # Into a pipe or a file: the table's own width rather than rich's default of 80 columns.
    console = out
    if not out.is_terminal:
        width = Console(width=WIDE).measure(table).maximum
        console = Console(highlight=False, width=min(width, WIDE), no_color=True)
    console.print(table)


def _live(options: FleetOptions, monitor: FleetMonitor, refresh: float) -> None:
    from rich.live import Live

    from edged.fleet.view import render_table

    aggregator = monitor.aggregator

    def table() -> Any:
        return render_table(
            aggregator.snapshot(),
            counters=aggregator.counters(),
            broker=options.broker.address,
            connected=monitor.connected,
        )

    pause = threading.Event()
    try:
        with Live(table(), console=out, auto_refresh=False, transient=False) as live:
            while True:
                pause.wait(refresh)
                live.update(table(), refresh=True)
    except KeyboardInterrupt:
        pass


# -- subcommands ---------------------------------------------------------------------------------
# Each declares the options of `fleet_options` too, so that they may follow its name.

SERVE_HELP = "\n\n".join(
    (
        "Serve the fleet as a live web page (a summary and a card per device with charts of tok/s "
        "and the hottest temperature, updated by Server-Sent Events) and as one Prometheus endpoint, "
        "/metrics: every device's telemetry with a `device` label, for boards Prometheus cannot reach.",
        "Also: /api/fleet (JSON), /api/devices/ID, /events (SSE), /health (503 while the broker is "
        "unreachable, or when no message at all arrived for 3 --interval periods, at least 10 s). "
        "The page has no login: keep --listen on loopback or behind an authenticating proxy.",
        "The broker options, --config, --topic-prefix and --interval go before or after `serve`; "
        "given in both places, the one after `serve` is used.",
        "Examples:",
        "edged fleet serve --mqtt broker.lan   (http://127.0.0.1:8088/)",
        'EDGED_MQTT__PASSWORD="$(cat ~/.config/edged/broker-pass)" edged fleet --mqtt broker.lan '
        "--username dashboard serve --listen [::1]:9100   (not --password: ps shows it)",
        "Exit codes: 0 stopped (SIGINT/SIGTERM), 2 usage or --listen address unusable, 3 broker not "
        "reachable at start (later it reconnects), 78 bad configuration.",
    )
)


@fleet_app.command(help=SERVE_HELP)
def serve(
    ctx: typer.Context,
    mqtt: BrokerOpt = None,
    config: ConfigOpt = None,
    username: UsernameOpt = None,
    password: PasswordOpt = None,
    tls: TlsOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_verify: TlsVerifyOpt = None,
    protocol: ProtocolOpt = None,
    topic_prefix: TopicPrefixOpt = None,
    interval: IntervalOpt = None,
    listen: Annotated[
        str,
        typer.Option(metavar="HOST:PORT", help="Address of the web server: HOST:PORT, [IPV6]:PORT."),
    ] = "127.0.0.1:8088",
    resolution: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds between two points of a device's history (charts)."),
    ] = 10.0,
    history: Annotated[
        float, typer.Option(min=1.0, help="Minutes of history kept per device (at most 7200 points).")
    ] = 60.0,
    max_devices: Annotated[
        int, typer.Option(min=1, help="Devices held at most (a new one evicts the longest gone).")
    ] = 1000,
) -> None:
    from edged.fleet.web import ListenError, bind, create_app, parse_listen, url_of
    from edged.fleet.web import serve as run_server
    from edged.mqtt.broker import BrokerSetupError
    from edged.mqtt.client import BrokerUnreachable

    options = fleet_options(ctx)
    points = round(history * 60 / resolution)
    if not 1 <= points <= 7200:
        _fail(EXIT_USAGE, f"--history {history:g} min at --resolution {resolution:g} s is {points} points")
    try:
        sock = bind(*parse_listen(listen))
    except ListenError as exc:
        _fail(EXIT_USAGE, str(exc))
    aggregator = options.aggregator(max_devices=max_devices, history_points=points, history_s=history * 60)
    try:
        monitor = options.monitor(aggregator).start()
    except BrokerSetupError as exc:
        sock.close()
        _fail(EXIT_USAGE, str(exc))
    except BrokerUnreachable as exc:
        sock.close()
        _fail(EXIT_UNREACHABLE, str(exc))
    app = create_app(
        aggregator,
        broker=options.broker.address,
        topic_prefix=options.topic_prefix,
        connected=lambda: monitor.connected,
    )
    err.print(f"edged fleet: serving {url_of(sock)} (metrics at /metrics), broker {options.broker.address}")
    with monitor, sock:
        run_server(app, sock)


def main() -> None:
    """``python -m edged.fleet.cli``: the same command on its own (``edged fleet`` once registered)."""
    fleet_app(prog_name="edged fleet")


if __name__ == "__main__":
    main()

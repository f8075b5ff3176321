"""Command-line options shared by `edged` (edged/cli.py) and `edged fleet` (edged/fleet/cli.py), which
cannot import each other (edged/cli.py mounts the fleet commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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

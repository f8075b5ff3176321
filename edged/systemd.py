"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, STOPPING) and socket activation.

All of it is inert when edged does not run under systemd (no NOTIFY_SOCKET, no LISTEN_FDS).
"""

from __future__ import annotations

import os
import socket

import structlog
from sdnotify import SystemdNotifier

log = structlog.get_logger(__name__)

SD_LISTEN_FDS_START = 3


def inherited_sockets() -> list[socket.socket]:
    """Sockets passed by systemd (``LISTEN_FDS``/``LISTEN_PID``), e.g. from ``edged.socket``."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    return sockets


def watchdog_interval() -> float | None:
    """Half of ``WATCHDOG_USEC`` (systemd's advice), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


class Notifier:
    """sd_notify messages, through the sdnotify library; a no-op outside systemd."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = SystemdNotifier() if self.enabled else None
        self._status = ""

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def ready(self, text: str) -> None:
        self._send(f"READY=1\nSTATUS={text}")
        self._status = text
        if self.enabled:
            log.info("notified systemd: ready", status=text)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    def close(self) -> None:
        """Close the notification socket (sdnotify keeps it open for the process's life)."""
        sock = getattr(self._notifier, "socket", None)
        if sock is not None:
            sock.close()
        self._notifier = None

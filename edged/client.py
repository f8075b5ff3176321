"""A small client for the daemon's Unix socket (used by the CLI; handy for scripts)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse


class DaemonUnreachable(Exception):
    """No daemon answers on the socket."""


class DaemonError(Exception):
    """The daemon answered with an error body ``{"error": {...}}``."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "error"))
        self.status = status
        self.error = error


class Client:
    def __init__(self, socket_path: Path, timeout: float = 3600.0) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://edged",
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def _unreachable(self, exc: Exception) -> DaemonUnreachable:
        if not self.socket_path.exists():
            return DaemonUnreachable(f"is edged running? no socket at {self.socket_path}")
        return DaemonUnreachable(f"is edged running? cannot connect to {self.socket_path}: {exc}")

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        try:
            body = response.json()
        except json.JSONDecodeError:
            body = {"error": {"code": "invalid_response", "message": response.text[:200]}}
        if response.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            raise DaemonError(response.status_code, error or {"code": "http_error", "message": str(body)})
        return body

    def get(self, path: str) -> Any:
        try:
            return self._check(self._http.get(path))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def chat(self, body: dict[str, Any]) -> Any:
        try:
            return self._check(self._http.post("/v1/chat/completions", json={**body, "stream": False}))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield each SSE chunk; raises `DaemonError` for an error status or an error chunk."""
        try:
            with connect_sse(
                self._http, "POST", "/v1/chat/completions", json={**body, "stream": True}
            ) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    self._check(source.response)
                for event in source.iter_sse():
                    if event.data == "[DONE]":
                        return
                    chunk = event.json()
                    if "error" in chunk:
                        raise DaemonError(200, chunk["error"])
                    yield chunk
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

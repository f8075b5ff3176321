"""The one HTTP error renderer: the shape a route's clients read, the status, type and Retry-After
of the error's class - for the handlers and the TCP key gate alike."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from edged import errors
from edged.transports.http.errors import error_response, render, send_error, shape_of


def test_openai_and_ollama_shapes() -> None:
    status, body, headers = render(errors.ModelNotFound("no model 'x'", param="model"))
    assert status == 404 and headers == {}
    assert body == {
        "error": {
            "code": "model_not_found",
            "message": "no model 'x'",
            "type": "invalid_request_error",
            "param": "model",
        }
    }
    status, body, _ = render(errors.ModelNotFound("no model 'x'"), "ollama")
    assert (status, body) == (404, {"error": "no model 'x'"})


@pytest.mark.parametrize(
    ("cls", "retry"), [(errors.QueueFull, "1"), (errors.NotReady, "2"), (errors.ThermalPaused, "10")]
)
def test_unavailable_brings_retry_after_in_both_shapes(cls: type[errors.Unavailable], retry: str) -> None:
    for shape in ("openai", "ollama"):
        status, _, headers = render(cls("busy"), shape)  # type: ignore[arg-type]
        assert status == 503 and headers == {"Retry-After": retry}
    assert error_response(cls("busy")).headers["retry-after"] == retry


def test_routes_under_api_are_ollamas() -> None:
    assert shape_of("/api/chat") == "ollama" and shape_of("/api/tags") == "ollama"
    assert shape_of("/v1/chat/completions") == "openai" and shape_of("/apis") == "openai"


def sent(
    error: errors.EdgedError, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(send_error(send, error, shape_of(path), headers))
    start, body = messages
    raw = {k.decode(): v.decode() for k, v in start["headers"]}
    assert raw["content-length"] == str(len(body["body"]))
    return start["status"], raw, json.loads(body["body"])


def test_the_key_gate_answers_with_the_classes_type() -> None:
    """The TCP 429 said invalid_request_error while RateLimited says rate_limit_error: one renderer."""
    status, headers, body = sent(
        errors.RateLimited("over", retry_after=7), "/v1/chat/completions", {"retry-after": "7"}
    )
    assert status == 429 and headers["retry-after"] == "7"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["retry_after"] == 7
    status, headers, body = sent(
        errors.Unauthorized("no API key"), "/api/chat", {"www-authenticate": "Bearer"}
    )
    assert (status, body) == (401, {"error": "no API key"}) and headers["www-authenticate"] == "Bearer"

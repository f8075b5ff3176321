"""The error hierarchy: stable codes, HTTP statuses and OpenAI types (part of the external contract),
and the one body every transport renders."""

from __future__ import annotations

import pytest

from edged import errors
from edged.journal import JournalUnavailable

CONTRACT: list[tuple[type[errors.EdgedError], str, int, str]] = [
    (errors.InvalidRequest, "invalid_request", 400, "invalid_request_error"),
    (errors.ContextLengthExceeded, "context_length_exceeded", 400, "invalid_request_error"),
    (errors.PayloadTooLarge, "payload_too_large", 413, "invalid_request_error"),
    (errors.InvalidOutput, "invalid_output", 422, "invalid_request_error"),
    (errors.NotSupported, "not_supported", 501, "invalid_request_error"),
    (errors.NotFound, "not_found", 404, "invalid_request_error"),
    (errors.ModelNotFound, "model_not_found", 404, "invalid_request_error"),
    (errors.QueueFull, "queue_full", 503, "server_error"),
    (errors.NotReady, "not_ready", 503, "server_error"),
    (JournalUnavailable, "storage_unavailable", 503, "server_error"),
    (errors.RateLimited, "rate_limited", 429, "rate_limit_error"),
    (errors.Unauthorized, "unauthorized", 401, "invalid_request_error"),
    (errors.ThermalPaused, "thermal_paused", 503, "server_error"),
    (errors.StorageUnavailable, "storage_unavailable", 503, "server_error"),
    (errors.DeadlineExceeded, "deadline_exceeded", 504, "server_error"),
    (errors.Cancelled, "cancelled", 499, "invalid_request_error"),
    (errors.ShuttingDown, "cancelled", 499, "invalid_request_error"),
    (errors.BackendError, "backend_failed", 500, "server_error"),
    (errors.BackendUnavailable, "backend_unavailable", 500, "server_error"),
    (errors.TransportError, "transport_failed", 500, "server_error"),
    (errors.EdgedError, "internal_error", 500, "server_error"),
]


@pytest.mark.parametrize(
    ("cls", "code", "status", "kind"), CONTRACT, ids=[c[1] + "-" + c[0].__name__ for c in CONTRACT]
)
def test_codes_statuses_and_types_are_the_contracts(
    cls: type[errors.EdgedError], code: str, status: int, kind: str
) -> None:
    error = cls("what happened")
    assert (error.code, error.http_status, error.type) == (code, status, kind)
    assert error.to_dict() == {
        "error": {"code": code, "message": "what happened", "type": kind, "param": None}
    }


def test_the_body_carries_the_param_and_the_details() -> None:
    error = errors.ContextLengthExceeded("too long", param="messages", n_prompt_tokens=5000, n_ctx=2048)
    assert isinstance(error, errors.InvalidRequest), "a client catching invalid requests catches it too"
    assert error.to_dict() == {
        "error": {
            "code": "context_length_exceeded",
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "n_prompt_tokens": 5000,
            "n_ctx": 2048,
        }
    }
    assert str(error) == "too long" and error.details == {"n_prompt_tokens": 5000, "n_ctx": 2048}


def test_unavailable_says_when_to_retry() -> None:
    assert errors.QueueFull("full").retry_after == 1
    assert errors.NotReady("loading").retry_after == 2
    assert all(
        issubclass(c, errors.Unavailable) for c in (errors.QueueFull, errors.NotReady, JournalUnavailable)
    )
    assert not issubclass(errors.RateLimited, errors.Unavailable), "429, not 503"


def test_a_config_error_keeps_each_problem() -> None:
    error = errors.ConfigError(["model.ctx = 9999 (from file x): too big", "queue.max_depth = 'many' (...)"])
    assert error.problems == ["model.ctx = 9999 (from file x): too big", "queue.max_depth = 'many' (...)"]
    assert error.message == "model.ctx = 9999 (from file x): too big; queue.max_depth = 'many' (...)"
    assert error.code == "config_error"


def test_the_codes_a_client_can_receive_are_the_classes() -> None:
    """One list, derived from the classes: the OpenAPI document and the contract read it."""
    codes = errors.error_codes()
    assert len(codes) == len(set(codes))
    assert set(codes) == {code for cls, code, *_ in CONTRACT if cls.client_facing}
    assert "config_error" not in codes and "transport_failed" not in codes, "operator errors"
    assert {"unauthorized", "thermal_paused", "storage_unavailable", "backend_unavailable"} <= set(codes)


def test_a_detail_cannot_replace_the_code_or_the_message() -> None:
    error = errors.InvalidOutput("cut", content="{", code="forged", type="y")
    body = error.to_dict()["error"]
    assert (body["code"], body["message"], body["type"], body["param"]) == (
        "invalid_output",
        "cut",
        "invalid_request_error",
        None,
    )
    assert body["content"] == "{"
    assert list(body)[:4] == ["code", "message", "type", "param"], "the core first, as before"

"""One small error hierarchy with stable codes, shared by every transport.

The codes and HTTP statuses are part of the external contract: transports map an `EdgedError`
to their wire format (`edged.transports.http.errors` for HTTP, `error_message` for MQTT) and never
invent codes of their own; `error_codes` is the list every document derives from.
"""

from __future__ import annotations

from typing import Any, ClassVar


class EdgedError(Exception):
    """Base of every error edged reports to a client or an operator."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    client_facing: ClassVar[bool] = True
    """False for errors only the operator sees (a bad config, a listener that cannot bind)."""

    def __init__(self, message: str, *, param: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-shaped error body: ``{"error": {code, message, type, param, ...}}``."""
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "type": self.type,
            "param": self.param,
        }
        body.update((k, v) for k, v in self.details.items() if k not in _CORE)
        return {"error": body}


_CORE = frozenset({"code", "message", "type", "param"})
"""What a detail can never replace (``InvalidOutput(..., code=...)`` would have)."""


class ConfigError(EdgedError):
    """The configuration (file, environment, flags or a board profile) is invalid."""

    code = "config_error"
    client_facing = False

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class InvalidRequest(EdgedError):
    code = "invalid_request"
    http_status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"
    http_status = 413


class InvalidOutput(EdgedError):
    """Constrained output (a JSON schema) could not be completed: cut by max_tokens or the deadline,
    or (never by the grammar's design) not valid against the schema. Carries what was generated."""

    code = "invalid_output"
    http_status = 422
    type = "invalid_request_error"


class NotSupported(EdgedError):
    """A route or option edged (or the loaded backend) does not offer."""

    code = "not_supported"
    http_status = 501
    type = "invalid_request_error"


class NotFound(EdgedError):
    code = "not_found"
    http_status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Unavailable(EdgedError):
    """The daemon cannot take the job now; the client may retry after ``retry_after`` seconds."""

    http_status = 503
    retry_after: ClassVar[int] = 1


class QueueFull(Unavailable):
    code = "queue_full"


class ThermalPaused(Unavailable):
    """Reserved: the thermal governor would refuse new work. edged's governor queues instead (fewer
    slots, a pause between steps), so nothing raises it today; clients should treat it as
    ``queue_full``."""

    code = "thermal_paused"
    retry_after = 10


class StorageUnavailable(Unavailable):
    """The job journal cannot be opened or written (disk full, read-only, over
    ``journal.max_bytes``): the job was not accepted."""

    code = "storage_unavailable"


class NotReady(Unavailable):
    code = "not_ready"
    retry_after = 2


class RateLimited(EdgedError):
    """A client sent more jobs than its rate allows (``mqtt.rate_per_min``, ``http.rate_limit_per_min``)."""

    code = "rate_limited"
    http_status = 429
    type = "rate_limit_error"


class Unauthorized(EdgedError):
    """No API key, or a wrong one, on the TCP listener (OpenAI answers a bad key with this type)."""

    code = "unauthorized"
    http_status = 401
    type = "invalid_request_error"


class DeadlineExceeded(EdgedError):
    code = "deadline_exceeded"
    http_status = 504


class Cancelled(EdgedError):
    code = "cancelled"
    http_status = 499
    type = "invalid_request_error"


class ShuttingDown(Cancelled):
    """edged stopped before the job finished. A journaled MQTT job is not answered with this: it
    stays in the journal and runs again at the next start."""


class BackendError(EdgedError):
    """A backend failed to load or to generate."""

    code = "backend_failed"


class BackendUnavailable(BackendError):
    """No usable backend on this machine, or the one asked for by name cannot run here."""

    code = "backend_unavailable"


class TransportError(EdgedError):
    """A transport could not start (socket in use, cannot bind, ...)."""

    code = "transport_failed"
    client_facing = False


def error_classes() -> list[type[EdgedError]]:
    """Every error class, the base first, then in the order they are defined (depth first)."""
    out: list[type[EdgedError]] = []
    todo: list[type[EdgedError]] = [EdgedError]
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo[:0] = cls.__subclasses__()
    return out


def error_codes() -> list[str]:
    """The codes a client can receive, each once: the contract's list, the OpenAPI document's."""
    codes: list[str] = []
    for cls in error_classes():
        if cls.client_facing and cls.code not in codes:
            codes.append(cls.code)
    return codes

"""/openapi.json beyond what FastAPI derives: the request bodies the routes parse themselves, each
operation's error answers in its clients' shape (`edged.transports.http.errors`), and the streamed
answers of the job routes."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from edged.errors import error_codes
from edged.transports.http.errors import shape_of


def body_ref(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the handler parses itself, pointing at a schema `document` adds."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(
        description="The stable code; its HTTP status is the contract's.",
        json_schema_extra={"enum": list[Any](error_codes())},  # edged.errors' classes are the list
    )
    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description="OpenAI's error type.")
    param: str | None = Field(description="The request field at fault, if one is.")


class ErrorBody(BaseModel):
    """An error answer (OpenAI's shape); a code may bring details (n_prompt_tokens, n_ctx, ...)."""

    error: ErrorDetail


class OllamaErrorBody(BaseModel):
    """An error answer of the Ollama routes, in Ollama's shape; the HTTP status is edged's code's."""

    error: str


class HealthBody(BaseModel):
    status: str = Field(description="ok when ready; else the engine's state (loading, failed, ...).")
    error: str | None = Field(None, description="Why the model could not be loaded.")


_ERROR_STATUSES = {
    400: "invalid_request (malformed JSON, wrong types, unknown fields), context_length_exceeded",
    404: "not_found, model_not_found",
    413: "payload_too_large",
    422: "invalid_output: a JSON answer cut short by max_tokens or the deadline",
    499: "cancelled",
    500: "backend_failed",
    501: "not_supported",
    503: "queue_full, not_ready, storage_unavailable (Retry-After)",
    504: "deadline_exceeded",
}
_JOB_ERRORS = (400, 404, 413, 422, 499, 500, 501, 503, 504)
_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/chat/completions"): _JOB_ERRORS,
    ("post", "/v1/completions"): _JOB_ERRORS,
    ("get", "/metrics"): (404,),
    ("get", "/v1/jobs"): (400, 503),
    ("get", "/v1/jobs/{job_id}"): (404, 503),
    ("post", "/v1/jobs/{job_id}/cancel"): (404,),
    ("post", "/api/show"): (400, 404, 413),
    ("post", "/api/chat"): _JOB_ERRORS,
    ("post", "/api/generate"): _JOB_ERRORS,
}
"""The errors each operation can answer (the TCP listener adds 401 and 429 to all but /health)."""
_STREAMS = {
    "/v1/chat/completions": "text/event-stream",
    "/v1/completions": "text/event-stream",
    "/api/chat": "application/x-ndjson",
    "/api/generate": "application/x-ndjson",
}
"""The 200 answer of a job with ``stream``: server-sent events, or Ollama's JSON lines."""
_STREAM_ITEM: dict[str, dict[str, Any]] = {
    "text/event-stream": {  # one event (OpenAPI 3.1: the schema of a stream's media type is per event)
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "description": "A chunk as JSON, then the last chunk (finish_reason, usage, timings) "
                'and [DONE]; or, instead of the rest, an error as JSON ({"error": {code, ...}}).',
            }
        },
    },
    "application/x-ndjson": {
        "type": "object",
        "description": "One JSON line: a chunk, the last (done) or an error.",
    },
}


def _error_doc(status: int, body: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "description": _ERROR_STATUSES[status],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
    }
    if status == 503:
        retry = {"description": "Seconds to wait before trying again.", "schema": {"type": "string"}}
        doc["headers"] = {"Retry-After": {**retry, "required": True}}
    return doc


def document(app: FastAPI, models: tuple[type[BaseModel], ...], max_timeout_s: float) -> None:
    """Complete /openapi.json: the self-parsed request bodies in its components (with this daemon's
    jobs.max_timeout_s), each operation's error answers (400, not FastAPI's 422, for a bad
    parameter), and the streamed 200 answers."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            documented: tuple[type[BaseModel], ...] = (*models, ErrorBody, OllamaErrorBody)
            for model in documented:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
                if "timeout_s" in js["properties"]:
                    js["properties"]["timeout_s"]["anyOf"][0]["maximum"] = max_timeout_s
            for path, operations in schema["paths"].items():
                for method, operation in operations.items():
                    responses = operation["responses"]
                    responses.pop("422", None)  # validation errors are answered 400 invalid_request
                    body = "OllamaErrorBody" if shape_of(path) == "ollama" else "ErrorBody"
                    for status in _ERRORS.get((method, path), ()):
                        responses[str(status)] = _error_doc(status, body)
                    if path in _STREAMS:
                        responses["200"]["content"][_STREAMS[path]] = {"schema": _STREAM_ITEM[_STREAMS[path]]}
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

"""One error renderer for every HTTP answer: the route handlers, the request validation, the TCP
key gate and the connection limits all answer through `render`, in the shape the route's clients
read (OpenAI's ``{"error": {code, message, type, param}}``, Ollama's ``{"error": "..."}``), with the
HTTP status and type of the error's class in `edged.errors` - never a code or type of their own."""

from __future__ import annotations

import json
from typing import Any, Literal

from starlette.responses import JSONResponse

from edged.errors import EdgedError, InvalidRequest, Unavailable

Shape = Literal["openai", "ollama"]

OLLAMA_ROUTES = ("/api/",)
"""Paths answered in Ollama's shape."""


def shape_of(path: str) -> Shape:
    """The error shape a route's clients read: Ollama's under ``/api/``, OpenAI's elsewhere."""
    return "ollama" if path.startswith(OLLAMA_ROUTES) else "openai"


def render(error: EdgedError, shape: Shape = "openai") -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, body and headers of ``error``; an `Unavailable` error brings ``Retry-After``."""
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, Unavailable) else {}
    body: dict[str, Any] = {"error": error.message} if shape == "ollama" else error.to_dict()
    return error.http_status, body, headers


def describe_validation(errors: list[Any]) -> InvalidRequest:
    """Pydantic's errors about a request as one `InvalidRequest` naming the fields (malformed JSON
    as such), for the OpenAI bodies, FastAPI's query parameters and the body reader."""
    problems = []
    param = None
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return InvalidRequest(f"malformed JSON: {ctx.get('error', err.get('msg'))}")
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        param = param or where
        problems.append(f"{where}: {err.get('msg')}")
    return InvalidRequest("invalid request: " + "; ".join(problems), param=param)


def error_response(
    error: EdgedError, shape: Shape = "openai", headers: dict[str, str] | None = None
) -> JSONResponse:
    status, body, own = render(error, shape)
    return JSONResponse(body, status_code=status, headers={**own, **(headers or {})} or None)


async def send_error(
    send: Any, error: EdgedError, shape: Shape, headers: dict[str, str] | None = None
) -> None:
    """`render` for ASGI code below the app (the key gate, the connection limits)."""
    status, body, own = render(error, shape)
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in {**own, **(headers or {})}.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})

"""Fuzzing with tools nobody here wrote: hypothesis over the job schema and raw bytes on both
transports, schemathesis over the socket API's own ``/openapi.json``.

Everything runs against one real daemon on the embedded model: HTTP over its real Unix socket
(httpx; schemathesis through a `requests` adapter that connects to the socket), MQTT through a
real Mosquitto. Valid-looking jobs generate 1-2 tokens (``max_tokens`` 1-2, and the daemon's
``jobs.default_max_tokens`` is 2), and ``jobs.max_payload_bytes`` is small, so a case costs
milliseconds and an oversized one only a few kilobytes.

Invariants. Socket: every answer is 2xx or a JSON error whose code is a contract code with that
code's HTTP status (contract.md, "Error codes"); never a 500; an error answer is stable (the same
request again gets the same status and code). MQTT: every job payload gets exactly one final
message (``done``, or ``error`` with a contract code) on the topic it should, within a bounded
time. Both: the daemon is alive, ready and connected after the run, and stops cleanly.

Budget: ``EDGED_FUZZ_EXAMPLES`` cases per transport (default 150, derandomized: the same cases in
every ``make test``) and ``EDGED_FUZZ_API_EXAMPLES`` per OpenAPI operation and generation mode
(default 5). ``make fuzz`` sets 10,000 and 200 with ``EDGED_FUZZ_RANDOM=1`` (a new seed each run;
hypothesis prints it with a failure). No example database is written (``database=None``).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import re
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from conftest import Daemon
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from mqtt_helpers import Broker, Probe
from requests.adapters import HTTPAdapter
from schemathesis.config import SchemathesisConfig
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

EXAMPLES = int(os.environ.get("EDGED_FUZZ_EXAMPLES", "150"))
API_EXAMPLES = int(os.environ.get("EDGED_FUZZ_API_EXAMPLES", "5"))
RANDOM = os.environ.get("EDGED_FUZZ_RANDOM") == "1"

LIMIT = 8192
"""The fuzz daemon's jobs.max_payload_bytes: small, so oversized cases are cheap, and still above the
4300 digits of CPython's int parsing limit, so a number with thousands of digits fits in a job."""
DEVICE = "fuzz"
SLOW_S = 20.0
"""Most time for one socket answer (the fuzz daemon's jobs.timeout_s is 30 s)."""
ANSWER_S = 30.0
"""Most time for one MQTT job's final message (a valid job generates at most 2 tokens)."""

CONTRACT = {
    "invalid_request": 400,
    "context_length_exceeded": 400,
    "payload_too_large": 413,
    "not_found": 404,
    "model_not_found": 404,
    "queue_full": 503,
    "thermal_paused": 503,
    "not_ready": 503,
    "storage_unavailable": 503,
    "rate_limited": 429,
    "deadline_exceeded": 504,
    "cancelled": 499,
    "not_supported": 501,
    "invalid_output": 422,
    "unauthorized": 401,
}
"""contract.md, "Error codes", without backend_failed (500): a request must never make the backend
fail. The 5xx left are the documented 501 (an option edged does not offer), 503 and 504 (a job's
own timeout_s passed)."""

STATS: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


def hypothesis_settings(examples: int, shrink: bool = True) -> settings:
    """``shrink=False`` where a failing case costs a long wait (MQTT: no answer within ANSWER_S)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        phases=(Phase.explicit, Phase.generate, *((Phase.shrink,) if shrink else ())),
        suppress_health_check=(
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ),
        print_blob=True,
    )


def budget_s(cases: int, per_case_s: float) -> float:
    """A pytest-timeout for ``cases`` cases: generous per case, plus room for shrinking a failure."""
    return 120 + cases * per_case_s


# -- the daemon under fuzz -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory):
    broker = Broker(tmp_path_factory.mktemp("fuzz-broker")).start()
    yield broker
    broker.stop()


def mqtt_connected(d: Daemon) -> bool:
    with d.client(timeout=5) as c:
        mqtt = c.get("/status").json().get("mqtt")
    return bool(mqtt and mqtt["connected"])


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path, fuzz_broker: Broker):
    d = Daemon(
        tmp_path_factory.mktemp("fuzz-daemon"),
        EDGED_DEVICE_ID=DEVICE,
        EDGED_JOBS__MAX_PAYLOAD_BYTES=str(LIMIT),
        EDGED_JOBS__DEFAULT_MAX_TOKENS="2",
        EDGED_JOBS__TIMEOUT_S="30",
        EDGED_JOBS__MAX_TIMEOUT_S="60",
        EDGED_MQTT__HOST="127.0.0.1",
        EDGED_MQTT__PORT=str(fuzz_broker.port),
        EDGED_MQTT__RECONNECT_MAX_S="2",
    ).start()
    d.wait_ready()
    deadline = time.monotonic() + 20
    while not mqtt_connected(d):
        if time.monotonic() > deadline:
            pytest.fail(f"edged did not connect to the broker:\n{d.log()[-5000:]}")
        time.sleep(0.05)
    with d.client(timeout=5) as c:
        d.model = c.get("/v1/models").json()["data"][0]["id"]  # type: ignore[attr-defined]
    yield d
    print_stats()
    assert d.stop() == 0, d.log()[-5000:]


def assert_healthy(d: Daemon) -> None:
    """Alive, ready and connected to its broker."""
    assert d.proc is not None and d.proc.poll() is None, f"edged died:\n{d.log()[-5000:]}"
    with d.client(timeout=10) as c:
        assert c.get("/health").status_code == 200
    assert mqtt_connected(d), f"edged lost its broker:\n{d.log()[-5000:]}"


def print_stats() -> None:
    for name, counter in STATS.items():
        total = sum(counter.values())
        top = ", ".join(f"{k} {v}" for k, v in counter.most_common())
        print(f"\nfuzz {name}: {total} cases: {top}")


# -- strategies: JSON text with what json.dumps will not write ----------------------------------------


class Raw(str):
    """JSON text placed as is: NaN, Infinity, numbers of thousands of digits, lone surrogates."""


def dump(value: Any, ascii_only: bool = True) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=ascii_only)}:{dump(v, ascii_only)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


control_text = st.text(
    alphabet=st.one_of(st.characters(categories=("Cc", "Cf", "Zl", "Zp")), st.sampled_from("a-_.:/+#$ ")),
    max_size=24,
)
escaped_text = st.lists(
    st.sampled_from(
        [
            "\\u0000",
            "\\ud800",
            "\\udfff",
            "\\ud83d\\ude00",
            "\\n",
            "\\u001b[31m",
            "\\u202e",
            "a",
            "\\/",
            "\\\\",
        ]
    ),
    max_size=8,
).map(lambda parts: Raw('"' + "".join(parts) + '"'))
texts = st.one_of(st.text(max_size=40), control_text, escaped_text)
huge_numbers = st.one_of(
    st.integers(min_value=2**31 - 2, max_value=2**130),
    st.integers(min_value=-(2**130), max_value=-(2**31)),
    st.integers(min_value=19, max_value=5000).map(lambda digits: Raw("9" * digits)),
    st.sampled_from(
        [
            "NaN",
            "Infinity",
            "-Infinity",
            "1e309",
            "-1e309",
            "1e-400",
            "-0",
            "1E+2",
            "0.5e1",
            "18446744073709551616",
        ]
    ).map(Raw),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts, huge_numbers)
json_values = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=12,
)
deep = st.integers(min_value=1, max_value=3000).flatmap(
    lambda n: st.sampled_from(
        [Raw("[" * n + "]" * n), Raw('{"a":' * n + "1" + "}" * n), Raw("[" * n)]  # the last never closes
    )
)
anything = st.one_of(scalars, json_values, deep)


broken = st.shared(st.integers(min_value=0, max_value=2), key="broken")
"""Per case: 0 = a document whose fields may be anything; else only valid-looking values."""


def mixed(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` values; in a broken document, sometimes anything at all instead."""
    return broken.flatmap(lambda b: st.one_of(valid, valid, valid, anything) if b == 0 else valid)


tiny = st.integers(min_value=1, max_value=2)
bad_tokens = st.one_of(
    st.integers(max_value=0),
    st.booleans(),
    st.floats().filter(lambda f: not (f.is_integer() and f > 2)),  # 3.0 is a (valid) integer
    st.text(max_size=4),
    st.sampled_from(["2", 2.5, 1e-9, [1], {"n": 1}]),
)
"""Values a job refuses as max_tokens; never a number over 2 (a valid one: a case must stay fast)."""
max_tokens = broken.flatmap(lambda b: st.one_of(tiny, bad_tokens) if b == 0 else tiny)
job_ids = st.one_of(st.from_regex(r"[A-Za-z0-9._:-]{1,24}", fullmatch=True), control_text, escaped_text)
prompts = st.one_of(st.text(max_size=60), control_text, escaped_text)
big_bounds = st.one_of(st.integers(0, 3000), st.integers(3000, 10**7), st.just(2**70))
bound_bombs = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, big_bounds),
    st.builds(lambda n: {"type": "string", "minLength": n}, big_bounds),
    st.builds(lambda n: {"type": "array", "items": {"type": "integer"}, "maxItems": n}, big_bounds),
    st.builds(lambda n: {"type": "array", "items": {}, "minItems": n}, big_bounds),
    st.builds(lambda lo, hi: {"type": "string", "pattern": f"^a{{{lo},{hi}}}$"}, big_bounds, big_bounds),
    st.builds(
        lambda n, m: {"type": "string", "pattern": f"^(a?){{0,{n}}}(b{{0,{m}}})$"}, big_bounds, big_bounds
    ),
    st.builds(
        lambda n: {
            "type": "object",
            "properties": {"v": {"type": "string", "maxLength": n}},
            "required": ["v"],
        },
        big_bounds,
    ),
)
"""Every numeric bound the converter spells out, from harmless to 2^70, alone and in a property."""


def _nest(keyword: str, depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        if keyword == "not":
            schema = {"not": schema}
        elif keyword == "items":
            schema = {"type": "array", "items": schema}
        elif keyword == "anyOf":
            schema = {"anyOf": [schema, {"type": "null"}]}
        else:
            schema = {"type": "object", "properties": {"a": schema}}
    return schema


deep_schemas = st.builds(_nest, st.sampled_from(["not", "items", "anyOf", "properties"]), st.integers(1, 400))
"""Schemas nested 1 to 400 deep (jsonschema and the converter recurse once per level)."""

json_schemas = st.one_of(
    st.sampled_from(
        [
            {"type": "object"},
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "array", "items": {"type": "string", "maxLength": 3}},
            {"$ref": "#"},
            {"$ref": "#/$defs/x", "$defs": {"x": {"$ref": "#/$defs/x"}}},
            {"type": "string", "pattern": "(((("},
            {"anyOf": []},
            {"enum": []},
            {"type": "integer", "minimum": 5, "maximum": 1},
            {"type": "string", "minLength": 100000},
        ]
    ),
    bound_bombs,
    deep_schemas,
    st.dictionaries(
        st.sampled_from(["type", "properties", "items", "$ref", "enum", "format"]), json_values, max_size=3
    ),
)
grammars = st.one_of(
    st.sampled_from(
        [
            'root ::= "a"',
            "root ::= [0-9]+",
            "root ::= root",
            "root ::= (",
            "",
            "x ::= y",
            'root ::= "\\u0001" | "a"',
            'root ::= "\\u0000"',  # no token of the vocabulary starts it: invalid_output 422
        ]
    ),
    st.integers(1, 30000).map(lambda n: "root ::= " + "(" * n + '"a"' + ")" * n),  # the parser recursed
    st.tuples(st.integers(0, 5000), st.integers(0, 5000)).map(lambda t: f'root ::= "a"{{{t[0]},{t[1]}}}'),
    st.text(max_size=30),
)
stops = st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6))
logit_bias = st.dictionaries(
    st.one_of(st.integers(min_value=-5, max_value=60000).map(str), st.text(max_size=4), st.just("1.0")),
    st.one_of(st.floats(min_value=-150, max_value=150), anything),
    max_size=3,
)


def sampling_fields() -> dict[str, st.SearchStrategy[Any]]:
    return {
        "temperature": mixed(st.floats(min_value=0, max_value=2)),
        "top_p": mixed(st.floats(min_value=0, max_value=1)),
        "top_k": mixed(st.one_of(st.integers(min_value=0, max_value=100), huge_numbers)),
        "min_p": mixed(st.floats(min_value=0, max_value=1)),
        "repeat_penalty": mixed(st.one_of(st.floats(min_value=0, max_value=3), huge_numbers)),
        "frequency_penalty": mixed(st.floats(min_value=-2, max_value=2)),
        "presence_penalty": mixed(st.floats(min_value=-2, max_value=2)),
        "seed": mixed(st.one_of(st.integers(min_value=0, max_value=2**32), huge_numbers)),
        "stop": mixed(stops),
    }


def job_fields(model: str) -> dict[str, st.SearchStrategy[Any]]:
    """Every field of the job schema, each mostly valid and sometimes anything."""
    return {
        "id": mixed(job_ids),
        "model": mixed(st.sampled_from([model, "nope", model + ":latest"])),
        "raw": mixed(st.booleans()),
        "stream": mixed(st.booleans()),
        "logit_bias": mixed(logit_bias),
        "timeout_s": mixed(st.one_of(st.floats(min_value=1e-6, max_value=100), huge_numbers)),
        "ignore_eos": mixed(st.booleans()),
        "cache_prompt": mixed(st.booleans()),
        "response_format": mixed(
            st.one_of(
                st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}]),
                st.fixed_dictionaries(
                    {
                        "type": st.just("json_schema"),
                        "json_schema": st.fixed_dictionaries({"schema": json_schemas}),
                    }
                ),
            )
        ),
        "grammar": mixed(grammars),
        "think": mixed(st.booleans()),
        "reasoning_budget": mixed(st.one_of(st.integers(min_value=0, max_value=4), huge_numbers)),
        **sampling_fields(),
    }


def messages(roles: list[str]) -> st.SearchStrategy[Any]:
    def message(b: int) -> st.SearchStrategy[Any]:
        return st.fixed_dictionaries(
            {"role": mixed(st.sampled_from(roles)), "content": mixed(prompts)},
            optional={"name": mixed(st.text(max_size=8)), **({"bogus": anything} if b == 0 else {})},
        )

    return mixed(broken.flatmap(lambda b: st.lists(message(b), min_size=1, max_size=3)))


def unknown_fields() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.one_of(st.text(max_size=8), control_text), anything, max_size=2)


@st.composite
def job_documents(draw: st.DrawFn, model: str, *, openai: bool = False) -> dict[str, Any]:
    """A job as the socket's OpenAI routes or an MQTT payload has it: one of prompt/messages (or
    both, or neither), tiny max_tokens, every other field mostly valid."""
    roles = ["system", "user", "assistant", *(["developer", "tool", "function"] if openai else [])]
    doc: dict[str, Any] = {}
    which = draw(st.sampled_from(["messages", "prompt", "messages", "prompt", "both", "neither"]))
    if which in ("messages", "both"):
        doc["messages"] = draw(messages(roles))
    if which in ("prompt", "both"):
        doc["prompt"] = draw(mixed(prompts))
    doc["max_tokens"] = draw(max_tokens)
    optional = job_fields(model)
    if openai:
        optional.update(
            n=mixed(st.one_of(st.just(1), st.integers(), huge_numbers)),
            logprobs=mixed(st.booleans()),
            top_logprobs=mixed(st.integers(min_value=-1, max_value=30)),
            tool_choice=mixed(st.sampled_from(["auto", "none", "required", {"type": "function"}])),
            tools=mixed(st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=2), max_size=2)),
            modalities=mixed(st.lists(st.sampled_from(["text", "audio"]), max_size=2)),
            reasoning_effort=mixed(st.sampled_from(["none", "minimal", "low", "high", "max"])),
            max_completion_tokens=max_tokens,
            user=mixed(st.text(max_size=8)),
            metadata=mixed(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
        )
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        doc[key] = draw(optional[key])
    doc.update(draw(unknown_fields()) if draw(st.integers(0, 9)) == 0 else {})
    return doc


@st.composite
def ollama_documents(draw: st.DrawFn, model: str, route: str) -> dict[str, Any]:
    options = st.fixed_dictionaries(
        {
            "num_predict": broken.flatmap(
                lambda b: st.one_of(tiny, st.just(-1), *([bad_tokens] if b == 0 else []))
            )
        },
        optional={**sampling_fields(), "num_ctx": anything, "mirostat": anything, "bogus": anything},
    )
    fields: dict[str, st.SearchStrategy[Any]] = {
        "model": mixed(st.sampled_from([model, f"{model}:latest", "llama3:8b"])),
        "stream": mixed(st.booleans()),
        "format": mixed(st.one_of(st.sampled_from(["json", "", "xml"]), json_schemas)),
        "options": mixed(options),
        "think": mixed(st.sampled_from([True, False, "low", "high", "max"])),
        "keep_alive": mixed(st.sampled_from(["5m", 0, -1, 1.5])),
        "logprobs": mixed(st.booleans()),
    }
    required: dict[str, st.SearchStrategy[Any]] = {"options": mixed(options)}
    if route == "/api/chat":
        ollama_function = st.fixed_dictionaries(
            {"name": mixed(st.sampled_from(["get_weather", "turn on", ""]))},
            optional={
                "index": mixed(st.integers(-1, 3)),
                "arguments": mixed(st.one_of(st.dictionaries(st.text(max_size=4), json_values), st.text())),
                "parameters": mixed(st.dictionaries(st.sampled_from(["type", "properties"]), json_values)),
            },
        )
        ollama_call = st.fixed_dictionaries(
            {"function": mixed(ollama_function)}, optional={"id": mixed(st.text(max_size=8))}
        )
        ollama_message = st.fixed_dictionaries(
            {
                "role": mixed(st.sampled_from(["system", "user", "assistant", "tool"])),
                "content": mixed(prompts),
            },
            optional={
                "images": mixed(st.lists(st.text(max_size=4), max_size=1)),
                "tool_name": mixed(st.text()),
                "tool_call_id": mixed(st.text(max_size=8)),
                "tool_calls": mixed(st.lists(ollama_call, max_size=2)),
            },
        )
        required["messages"] = mixed(st.lists(ollama_message, max_size=3))
        fields["tools"] = mixed(
            st.lists(
                st.one_of(
                    st.dictionaries(st.text(max_size=5), json_values, max_size=2),
                    st.fixed_dictionaries(
                        {"type": mixed(st.just("function")), "function": mixed(ollama_function)}
                    ),
                ),
                max_size=2,
            )
        )
    elif route == "/api/generate":
        required["prompt"] = mixed(prompts)
        fields.update(
            system=mixed(prompts),
            raw=mixed(st.booleans()),
            suffix=mixed(st.text(max_size=4)),
            images=mixed(st.lists(st.text(max_size=4), max_size=1)),
            template=mixed(st.text(max_size=4)),
            context=mixed(st.lists(st.integers(), max_size=2)),
        )
    else:
        required = {}
        fields = {"model": fields["model"], "name": fields["model"], "verbose": mixed(st.booleans())}
    doc = {key: draw(value) for key, value in required.items()}
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        doc[key] = draw(fields[key])
    if route != "/api/show" and draw(st.integers(0, 3)) > 0:
        doc.setdefault("model", model)  # most cases reach the job translation, not model_not_found
    return doc


BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\x00", b"\xf4\x90\x80\x80", b"\xe2\x82"]


@st.composite
def bodies(draw: st.DrawFn, document: st.SearchStrategy[dict[str, Any]]) -> bytes:
    """A request body or MQTT payload: a (mostly) valid document, or bytes that are anything but."""
    kind = draw(
        st.sampled_from(
            ["document"] * 6 + ["mutated", "binary", "json", "deep", "oversized", "at_limit", "empty", "text"]
        )
    )
    if kind in ("document", "mutated"):
        raw = dump(draw(document), ascii_only=draw(st.booleans())).encode("utf-8", "surrogatepass")
        if kind == "document":
            return raw
        at = draw(st.integers(min_value=0, max_value=len(raw)))
        how = draw(st.sampled_from(["insert", "truncate", "flip"]))
        if how == "insert":
            return raw[:at] + draw(st.sampled_from(BAD_BYTES)) + raw[at:]
        if how == "truncate":
            return raw[:at]
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return dump(draw(json_values)).encode("utf-8", "surrogatepass")
    if kind == "deep":
        return str(draw(deep)).encode()
    if kind in ("oversized", "at_limit"):
        over = draw(st.integers(min_value=1, max_value=64)) if kind == "oversized" else 0
        # "x " is a token each: a prompt at the limit is over the 2048-token context (answered after
        # tokenizing, context_length_exceeded), not 2000 tokens to evaluate on a busy board
        frame = b'{"max_tokens":1,"prompt":""}'
        filler = (b"x " * LIMIT)[: LIMIT + over - len(frame)]
        return frame[:-2] + filler + frame[-2:]
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n\t ", b"{}", b"[]", b"null", b'""']))
    return draw(st.one_of(prompts.filter(lambda p: not isinstance(p, Raw)), control_text)).encode()


# -- the socket ------------------------------------------------------------------------------------

JOB_ROUTES = ["/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/show"]
OLLAMA_SHAPED = {"/api/show", "/api/chat", "/api/generate"}
"""Routes that answer errors in Ollama's shape, {"error": "<message>"} (status from edged's code)."""
ROUTE_METHODS = {
    "/v1/chat/completions": {"POST"},
    "/v1/completions": {"POST"},
    "/api/chat": {"POST"},
    "/api/generate": {"POST"},
    "/api/show": {"POST"},
    "/v1/jobs": {"GET"},
    "/health": {"GET"},
    "/v1/models": {"GET"},
}
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "\x7f/\x01",
]


@st.composite
def socket_requests(draw: st.DrawFn, model: str) -> dict[str, Any]:
    """One HTTP request: method, URL, headers, body and whether the body goes chunked."""
    kind = draw(st.sampled_from(["job"] * 8 + ["jobs_list", "job_get", "job_cancel", "method", "unknown"]))
    headers: dict[str, str] = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        headers["content-type"] = content_type
    request: dict[str, Any] = {"method": "POST", "headers": headers, "body": b"", "chunked": False}
    if kind == "job":
        path = draw(st.sampled_from(JOB_ROUTES))
        if path.startswith("/api/"):
            document = ollama_documents(model, path)
        else:
            document = job_documents(model, openai=True)
        request.update(path=path, body=draw(bodies(document)), chunked=draw(st.integers(0, 4)) == 0)
    elif kind == "jobs_list":
        params = draw(
            st.dictionaries(
                st.sampled_from(["limit", "before", "origin", "bogus"]),
                st.one_of(
                    st.integers(-5, 600).map(str),
                    st.integers(2**62, 2**70).map(str),  # around SQLite's largest INTEGER
                    st.text(max_size=300),
                    control_text,
                ),
                max_size=3,
            )
        )
        request.update(method="GET", path="/v1/jobs?" + urllib.parse.urlencode(params))
    elif kind in ("job_get", "job_cancel"):
        job_id = draw(st.one_of(job_ids.filter(lambda j: not isinstance(j, Raw)), st.text(max_size=30)))
        quoted = urllib.parse.quote(job_id, safe="")
        if kind == "job_get":
            request.update(method="GET", path=f"/v1/jobs/{quoted}")
        else:
            request.update(path=f"/v1/jobs/{quoted}/cancel")
    elif kind == "method":
        path = draw(st.sampled_from(sorted(ROUTE_METHODS)))
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
        request.update(
            method=method, path=path, body=draw(st.binary(max_size=20)) if method != "GET" else b""
        )
    else:
        segment = draw(st.text(max_size=20))
        request.update(
            path="/" + urllib.parse.quote(segment, safe="/"), method=draw(st.sampled_from(["GET", "POST"]))
        )
    return request


def post(path: str, body: bytes) -> dict[str, Any]:
    return {"method": "POST", "path": path, "headers": {}, "body": body, "chunked": False}


def get(path: str) -> dict[str, Any]:
    return {"method": "GET", "path": path, "headers": {}, "body": b"", "chunked": False}


SOCKET_FOUND = [
    # 500: an Ollama option the job schema refuses raised pydantic's ValidationError past the route
    (post("/api/generate", b'{"model": "%s", "prompt": "hi", "options": {"top_k": -5}}'), 400, None),
    # 500: reasoning_effort "none" (think: false) with raw: true failed the job's validation late
    (
        post("/v1/completions", b'{"prompt": "x", "raw": true, "reasoning_effort": "none", "max_tokens": 1}'),
        200,
        None,
    ),
    (
        post("/v1/chat/completions", b'{"prompt": "x", "raw": true, "reasoning_effort": "none"}'),
        400,
        "invalid_request",
    ),
    # 500 "edged could not prepare the job: IndexError": an empty grammar in the stack measure of the
    # bounds (make fuzz, schemathesis, 2026-12-07)
    (post("/v1/completions", b'{"prompt": "0", "raw": true, "grammar": "", "max_tokens": 1}'), 400, None),
    (
        post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "grammar": ""}'),
        400,
        "invalid_request",
    ),
    # no answer until the job's deadline: an empty raw prompt has no token to evaluate
    (post("/v1/completions", b'{"prompt": "", "max_tokens": 1}'), 400, "invalid_request"),
    # 200: wrong types were coerced ("max_tokens": true became 1, "stream": "true" streamed, " 1" a
    # token id); NaN and Infinity were numbers
    (post("/v1/chat/completions", b'{"prompt": "x", "max_tokens": true}'), 400, "invalid_request"),
    (
        post("/v1/chat/completions", b'{"prompt": "x", "max_tokens": 1, "stream": "true"}'),
        400,
        "invalid_request",
    ),
    (
        post("/v1/chat/completions", b'{"prompt": "x", "max_tokens": 1, "logit_bias": {" 1": 1}}'),
        400,
        "invalid_request",
    ),
    (
        post("/v1/chat/completions", b'{"prompt": "x", "max_tokens": 1, "repeat_penalty": Infinity}'),
        400,
        "invalid_request",
    ),
    (post("/api/chat", b'{"model": "%s", "messages": [], "stream": "no"}'), 400, None),
    # ... but 2.0 is the integer 2 (JSON Schema's integer)
    (post("/v1/chat/completions", b'{"prompt": "x", "max_tokens": 1.0}'), 200, None),
    # 500: a page before a sequence number SQLite cannot hold (OverflowError in the journal)
    (get("/v1/jobs?before=9223372036854775808"), 400, "invalid_request"),
    # 500 backend_failed: repeat_penalty 0 divides the logits by zero; with a grammar no token is left
    (
        post(
            "/v1/chat/completions",
            b'{"prompt": "x", "max_tokens": 1, "repeat_penalty": 0, "grammar": "root ::= \\"a\\""}',
        ),
        400,
        "invalid_request",
    ),
    # 405 without Allow; a 307 redirect for a trailing slash (or a job id "/")
    (
        {"method": "PUT", "path": "/v1/models", "headers": {}, "body": b"", "chunked": False},
        405,
        "invalid_request",
    ),
    ({"method": "GET", "path": "/v1/jobs/", "headers": {}, "body": b"", "chunked": False}, 404, "not_found"),
]
"""What fuzzing the socket found (each answered otherwise before), with the answer it gets now."""


def send(client: httpx.Client, request: dict[str, Any]) -> httpx.Response:
    body: bytes = request["body"]
    content: Any = body
    if request["chunked"]:
        pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        content = iter(pieces)  # no Content-Length: the body's size is found while reading it
    return client.request(request["method"], request["path"], headers=request["headers"], content=content)


def error_of(response: httpx.Response, path: str, method: str) -> tuple[int, str]:
    """(status, code) of an error answer; fails unless it is a contract error."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        pytest.fail(f"{method} {path}: {status} with a body that is not JSON: {response.content[:300]!r}")
    assert isinstance(body, dict) and "error" in body, f"{method} {path}: {status} {body!r}"
    error = body["error"]
    route = path.split("?", 1)[0]
    if isinstance(error, str):  # Ollama's shape: only its own routes, with a status of the contract
        assert route in OLLAMA_SHAPED, f"{method} {path}: Ollama-shaped error on an edged route: {body}"
        assert status in set(CONTRACT.values()), f"{method} {path}: {status} {body}"
        return status, "ollama"
    assert isinstance(error, dict) and {"code", "message", "type", "param"} <= set(error), body
    code = error["code"]
    if status == 405:  # the one HTTP-level status outside the table: a method the route does not take
        allowed = {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}
        assert allowed, f"405 without Allow: {method} {path}"
        assert code == "invalid_request" and method not in allowed, (body, allowed)
        return status, code
    assert code in CONTRACT, f"{method} {path}: {status} with a code outside the contract: {body}"
    assert CONTRACT[code] == status, f"{method} {path}: {code} answered with HTTP {status}: {body}"
    if status in (429, 503):
        assert response.headers.get("retry-after"), f"{status} without Retry-After: {body}"
    return status, code


def check_answer(response: httpx.Response, request: dict[str, Any]) -> str:
    """Fails unless ``response`` keeps the socket's invariants; returns a label for the statistics."""
    method, path, status = request["method"], request["path"], response.status_code
    assert status != 500, f"{method} {path} {request['body'][:500]!r}: 500 {response.text[:1000]}"
    if status < 300:
        kind = response.headers.get("content-type", "")
        if kind.startswith("text/event-stream"):  # SSE: chunks, then [DONE] or an error event
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events, f"{method} {path}: an empty event stream"
            for event in events[:-1]:
                assert "error" not in json.loads(event), f"{method} {path}: an error event before the end"
            if events[-1] != "[DONE]":
                error = json.loads(events[-1])["error"]
                assert error["code"] in CONTRACT, error
                return f"{status}+{error['code']}"
            return str(status)
        if kind.startswith("application/x-ndjson"):
            lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
            assert lines and (lines[-1].get("done") or "error" in lines[-1]), lines[-3:]
            return str(status)
        if kind.startswith("application/json"):
            response.json()
        return str(status)
    status, code = error_of(response, path, method)
    return f"{status} {code}"


@pytest.mark.timeout(budget_s(EXAMPLES, 2.0))
def test_socket_fuzz(fuzz_daemon: Daemon) -> None:
    """hypothesis: job documents (valid fields mixed with wrong types, huge numbers, NaN, deep
    nesting, control characters), raw and invalid UTF-8 bytes, oversized and chunked bodies, job
    ids and queries, wrong methods, unknown routes — each answered by the contract."""
    model: str = fuzz_daemon.model  # type: ignore[attr-defined]
    stats = STATS["socket"]
    with fuzz_daemon.client(timeout=60) as client:

        @hypothesis_settings(EXAMPLES)
        @given(request=socket_requests(model))
        def case(request: dict[str, Any]) -> None:
            note(f"request: {request!r}")
            assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None, "edged died"
            response = send(client, request)
            answer = check_answer(response, request)
            # a job of 1-2 tokens: a hang shows as a slow answer (the daemon's own deadline is 30 s)
            assert response.elapsed.total_seconds() < SLOW_S, f"{answer} after {response.elapsed}"
            stats[answer] += 1
            if request["method"] != "GET" and answer[:3] in ("400", "404", "405", "413", "501"):
                again = check_answer(send(client, request), request)  # stable: the same error again
                assert again == answer, f"{request}: {answer} then {again}"

        case()
    assert_healthy(fuzz_daemon)


# -- MQTT ------------------------------------------------------------------------------------------

JOBS_TOPIC = f"edged/{DEVICE}/jobs"
CANCEL_TOPIC = f"edged/{DEVICE}/cancel"
ERRORS_TOPIC = f"edged/{DEVICE}/errors"
NOT_ANSWERS = {JOBS_TOPIC, CANCEL_TOPIC, f"edged/{DEVICE}/status", f"edged/{DEVICE}/telemetry"}

reply_tos = st.one_of(
    st.text(alphabet="abc", max_size=3).map(lambda s: f"fuzz/rt/{s}"),
    control_text.filter(lambda t: t not in NOT_ANSWERS),
    escaped_text,
    st.sampled_from(["", "a/+", "#", "fuzz/#/x", "$SYS/fuzz", "/", "fuzz//rt"]),
    st.sampled_from(
        [f"edged/{DEVICE}/status", f"edged/{DEVICE}/jobs", "edged/fleet/jobs", "homeassistant/x"]
    ),
    st.tuples(st.integers(1000, 5000), st.sampled_from(["x", "+", "#", "/"])).map(
        lambda t: "fuzz/" + t[1] * t[0]  # long, and long with wildcards
    ),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=2), max_size=2),
)


SHARED_IDS = ("shared-1", "shared-2", "job-1")
"""Ids many cases reuse, each from its own response topic: none may be answered as another's job."""

BAD_RESPONSE_TOPICS = (
    f"edged/{DEVICE}/status",
    f"edged/{DEVICE}/jobs",
    f"edged/{DEVICE}/results/x",
    "edged/fleet/jobs",
    "homeassistant/sensor/x/config",
    "$SYS/fuzz",
    "fuzz/" + "x" * 1100,
)
"""v5 Response Topics an answer may not go to (edged's own namespace, discovery, ``$`` topics, over
1024 bytes); wildcards and control characters are refused by Mosquitto itself, before edged."""


@st.composite
def mqtt_documents(draw: st.DrawFn, model: str) -> dict[str, Any]:
    doc = draw(job_documents(model))
    if draw(st.integers(0, 3)) == 0:
        doc["reply_to"] = draw(reply_tos)
    if draw(st.integers(0, 3)) == 0:
        doc["id"] = draw(st.sampled_from(SHARED_IDS))
    return doc


cancel_documents = st.one_of(
    st.fixed_dictionaries({"id": mixed(job_ids)}, optional={"reason": anything}),
    st.dictionaries(st.text(max_size=4), anything, max_size=2),
)


@st.composite
def mqtt_cases(draw: st.DrawFn, model: str) -> dict[str, Any]:
    if draw(st.integers(0, 9)) == 0:
        return {"topic": CANCEL_TOPIC, "payload": draw(bodies(cancel_documents)), "respond": False}
    respond = draw(st.integers(0, 9))
    return {
        "topic": JOBS_TOPIC,
        "payload": draw(bodies(mqtt_documents(model))),
        "respond": respond > 1,  # else the answer goes to reply_to, results/ or errors
        "bad_response_topic": draw(st.sampled_from(BAD_RESPONSE_TOPICS)) if respond == 1 else None,
    }


MQTT_FOUND = [
    # the answer published to a topic with a NUL (or any control character): the broker disconnects
    # edged, which sends it again after every reconnect - edged never stayed connected again
    b'{"prompt": "hi", "max_tokens": 1, "reply_to": "fuzz/a\\u0000b"}',
    # unanswered: the answer went to a $ topic, which no client sees
    b'{"prompt": "hi", "max_tokens": 1, "reply_to": "$SYS/fuzz"}',
    # unanswered: a prompt with a lone surrogate could not be tokenized (UnicodeEncodeError)
    b'{"prompt": "a\\ud800b", "max_tokens": 1}',
    # unanswered: a number of 5000 digits raised ValueError (int parsing limit), not JSONDecodeError
    b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
]
"""What fuzzing MQTT found: payloads never answered before, answered invalid_request on the errors
topic now (none has a response topic: the first two would have been published to their reply_to)."""


def mqtt_messages(probe: Probe, until: float) -> Any:
    """Messages on answer topics (anything but edged's own inputs, status and telemetry) as JSON."""
    while (left := until - time.monotonic()) > 0:
        try:
            topic, payload, props = probe.messages.get(timeout=left)
        except queue.Empty:
            return
        if topic in NOT_ANSWERS or topic.startswith("homeassistant/"):
            continue
        try:
            message = json.loads(payload)
        except ValueError:
            pytest.fail(f"a message on {topic!r} that is not JSON: {payload[:300]!r}")
        yield topic, message, props


def check_final(topic: str, message: dict[str, Any]) -> str:
    assert message.get("status") in ("done", "error"), f"{topic}: {message}"
    assert message.get("device_id") == DEVICE, message
    if message["status"] == "done":
        assert isinstance(message.get("content"), str), message
        return "done"
    error = message.get("error")
    assert isinstance(error, dict) and {"code", "message", "type", "param"} <= set(error), message
    assert error["code"] in CONTRACT, f"{topic}: a code outside the contract: {message}"
    return error["code"]


@pytest.mark.timeout(budget_s(EXAMPLES, 3.0))
def test_mqtt_fuzz(fuzz_daemon: Daemon, fuzz_broker: Broker) -> None:
    """hypothesis through a real Mosquitto: job payloads (the job schema with reply_to, bare text,
    invalid UTF-8, huge numbers, NaN, deep nesting, control characters in ids and reply_to topics,
    oversized) and cancel payloads. Every job gets exactly one final message, on its v5 response
    topic (with its correlation data) when it has one, within ANSWER_S; every message on the errors
    topic has a contract code."""
    model: str = fuzz_daemon.model  # type: ignore[attr-defined]
    stats = STATS["mqtt"]
    numbers = itertools.count()
    probe = Probe(fuzz_broker.port)
    try:
        probe.subscribe("#")

        @hypothesis_settings(EXAMPLES, shrink=False)
        @given(case=mqtt_cases(model))
        def case(case: dict[str, Any]) -> None:
            note(f"case: {case!r}")
            assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None, "edged died"
            n = next(numbers)
            cancel: list[str] | None = None
            if case["topic"] == CANCEL_TOPIC:
                # A cancel has no answer of its own (a bad one is reported on the errors topic); a job
                # after it, answered in order, bounds the wait for whatever the cancel caused.
                probe.publish(CANCEL_TOPIC, case["payload"])
                case, cancel = {"topic": JOBS_TOPIC, "payload": b"{}", "respond": True}, []
            response_topic = f"fuzz/r/{n}" if case["respond"] else None
            correlation = f"c{n}".encode() if case["respond"] else None
            bad = case.get("bad_response_topic")
            probe.publish(
                JOBS_TOPIC, case["payload"], response_topic=bad or response_topic, correlation=correlation
            )
            for topic, message, props in mqtt_messages(probe, time.monotonic() + ANSWER_S):
                if "status" not in message:
                    assert {"id", "seq", "delta"} <= set(message), f"{topic}: {message}"
                    continue  # a streamed chunk
                if cancel is not None and topic == ERRORS_TOPIC:
                    cancel.append(check_final(topic, message))
                    assert len(cancel) == 1, f"case {n}: a cancel reported {cancel}"
                    continue
                if bad is not None:  # refused before anything else: nothing is published there
                    assert topic == ERRORS_TOPIC, f"case {n}: a final message on {topic!r}: {message}"
                    assert check_final(topic, message) == "invalid_request", message
                    assert "Response Topic" in message["error"]["message"], message
                    stats["bad response topic: invalid_request"] += 1
                    return
                if response_topic is not None:
                    assert topic == response_topic, f"case {n}: a final message on {topic!r}: {message}"
                    assert getattr(props, "CorrelationData", None) == correlation, message
                    assert "duplicate" not in message, f"case {n}: answered as another's job: {message}"
                label = check_final(topic, message)
                stats[
                    label if cancel is None else f"cancel: {cancel[0] if cancel else 'nothing reported'}"
                ] += 1
                return
            pytest.fail(f"case {n}: no final message within {ANSWER_S} s for {case['payload'][:300]!r}")

        case()
        late = [(t, m) for t, m, _ in mqtt_messages(probe, time.monotonic() + 2.0) if "status" in m]
        assert not late, f"answers after every job had its one answer: {late[:5]}"
    finally:
        probe.close()
    assert_healthy(fuzz_daemon)


# -- schemathesis: the socket API's own /openapi.json ------------------------------------------------


class _UnixConnection(HTTPConnection):
    """urllib3's HTTP connection, over a Unix socket."""

    def __init__(self, *args: Any, socket_path: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if isinstance(self.timeout, (int, float)):
                sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        return sock


class _UnixPool(HTTPConnectionPool):
    ConnectionCls = _UnixConnection


class UnixAdapter(HTTPAdapter):
    """A `requests` adapter that sends every request to one Unix socket (schemathesis speaks
    `requests`)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.pool = _UnixPool("edged", maxsize=2, socket_path=str(path))

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ):
        return self.pool

    def close(self) -> None:
        super().close()
        self.pool.close()


@pytest.fixture(scope="module")
def unix_session(fuzz_daemon: Daemon):
    session = requests.Session()
    session.mount("http://edged/", UnixAdapter(fuzz_daemon.socket))
    yield session
    session.close()


@pytest.fixture(scope="module")
def socket_api(unix_session: requests.Session):
    """The schema as the daemon serves it, at /openapi.json over its socket."""
    response = unix_session.get("http://edged/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    config = SchemathesisConfig.from_dict(
        {
            "base-url": "http://edged",
            "request-timeout": 60,
            "checks": {
                # the contract's 5xx for valid requests: not_supported, queue_full/not_ready, and
                # deadline_exceeded (a timeout_s of microseconds); never 500
                "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "501", "503", "504"]},
                # replaced by valid_requests_accepted (below), which knows which refusals the
                # schema cannot foresee
                "positive_data_acceptance": {"enabled": False},
                # a body over jobs.max_payload_bytes is refused whatever it says (413, documented)
                "negative_data_rejection": {
                    "expected-statuses": [
                        *("400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428"),
                        *("429", "5xx"),
                    ]
                },
            },
        }
    )
    return schemathesis.openapi.from_dict(response.json(), config=config)


@pytest.fixture
def _schemathesis_nodeid(request: pytest.FixtureRequest) -> None:
    """schemathesis' lazy loader renames the pytest item through ``_nodeid``, which pytest 9.2's
    items no longer have; give it one (reporting only)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def json_body(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        raise AssertionError(
            f"{response.status_code} with a body that is not JSON: {response.text[:300]!r}"
        ) from None


@schemathesis.check
def contract_error_codes(ctx: Any, response: Any, case: Any) -> bool | None:
    """An error answer has a contract code and that code's HTTP status (Ollama's routes: its
    {"error": "<message>"} shape with a contract status)."""
    status = response.status_code
    if status < 400:
        return None
    body = json_body(response)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        assert case.operation.path in OLLAMA_SHAPED, f"Ollama-shaped error on {case.operation.label}: {body}"
        assert status in set(CONTRACT.values()), f"{status} is not a contract status: {body}"
        return True
    assert isinstance(error, dict), f"{status} without an error body: {body}"
    if status == 405:
        assert error.get("code") == "invalid_request", body
        return True
    assert CONTRACT.get(error.get("code")) == status, f"{status} with code {error.get('code')!r}: {body}"
    return True


SEMANTIC = (
    "grammar",
    "response_format",
    "logit_bias",
    "id",
    "tools",
    "functions",
    "tool_choice",
    "function_call",
)
"""Fields a schema can only shape: a GBNF grammar that must parse, a JSON schema llama.cpp's converter
must take (also a tool's parameters), token ids of the loaded model's vocabulary, a job id not used
before, tool names unique and a tool choice naming one of them."""
OLLAMA_SEMANTIC = ("response_format", "logit_bias", "invalid request: options.stop")


@schemathesis.check
def valid_requests_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' positive_data_acceptance, less what depends on more than the schema: a 400 for
    a field of SEMANTIC or context_length_exceeded (the prompt's tokens, not its characters), 422
    invalid_output (a JSON answer cut by max_tokens 2), 404 (an unknown model or job), 413 (the
    body's size), and the contract's 5xx."""
    meta = case.meta
    status = response.status_code
    if meta is None or not meta.generation.mode.is_positive or status < 400 or status in (404, 413):
        return None
    if status >= 500:
        return None
    body = json_body(response)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        param = re.split(r"[.\[]", str(error.get("param") or ""))[0]  # tools[0].function.name: tools
        if status == 400 and (error.get("code") == "context_length_exceeded" or param in SEMANTIC):
            return None
        if status == 400 and str(error.get("param") or "").endswith("function.arguments"):
            return None  # an earlier call's arguments: the text of a JSON object
        if status == 422 and error.get("code") == "invalid_output":
            return None
    elif isinstance(error, str):  # Ollama's shape: the message names the field
        if (status == 400 and error.startswith(OLLAMA_SEMANTIC)) or "tokens, which leaves no room" in error:
            return None
        if status == 422:
            return None
    raise AssertionError(f"a schema-valid request refused: {status} {body}")


def tiny_generation(case: Any) -> None:
    """Schema-valid jobs may ask for any max_tokens; cases stay fast with 2 at most."""

    def big(value: Any) -> bool:  # a JSON number over 2 (2.0 is an integer too)
        return type(value) in (int, float) and value > 2

    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if big(body.get(key)):
            body[key] = 2
    options = body.get("options")
    if isinstance(options, dict) and big(options.get("num_predict")):
        options["num_predict"] = 2


socket_schema = schemathesis.pytest.from_fixture("socket_api")


@pytest.mark.timeout(budget_s(API_EXAMPLES * 40, 3.0))
@pytest.mark.usefixtures("_schemathesis_nodeid")
@socket_schema.parametrize()
@hypothesis_settings(API_EXAMPLES)
def test_openapi_schemathesis(case: Any, unix_session: requests.Session, fuzz_daemon: Daemon) -> None:
    """schemathesis over the socket: every operation of /openapi.json, schema-valid and invalid
    cases (coverage and fuzzing phases), all its checks (no 5xx but the contract's, documented
    status codes and content types, responses that match their schemas, valid data accepted and
    invalid data refused, 405 with Allow for other methods) and the contract's error codes."""
    tiny_generation(case)
    STATS["schemathesis"][case.operation.label] += 1
    case.call_and_validate(session=unix_session)
    assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None, "edged died"


# -- what fuzzing found in the MQTT transport and the scheduler (each fixed) -----------------------------


def publish_and_wait(
    broker: Broker, topic: str, payload: bytes, listen: str, *, respond: bool = True, timeout: float = 5.0
) -> list[dict]:
    """Publish ``payload`` (a job with ``listen`` as its response topic when ``respond``) and
    collect the final messages that arrive on ``listen`` within ``timeout``."""
    probe = Probe(broker.port)
    try:
        probe.subscribe(listen)
        probe.publish(topic, payload, response_topic=listen if respond and topic == JOBS_TOPIC else None)
        return [m for m in probe.quiet(timeout) if "status" in m]
    finally:
        probe.close()


@pytest.mark.timeout(60)
def test_mqtt_job_nested_deeper_than_python_parses_is_answered(
    fuzz_daemon: Daemon, fuzz_broker: Broker
) -> None:
    depth = 2000
    answers = publish_and_wait(fuzz_broker, JOBS_TOPIC, b"[" * depth + b"]" * depth, "fuzz/deep")
    assert [a["error"]["code"] for a in answers] == ["invalid_request"]


@pytest.mark.timeout(60)
def test_mqtt_job_with_a_lone_surrogate_id_is_answered(fuzz_daemon: Daemon, fuzz_broker: Broker) -> None:
    answers = publish_and_wait(
        fuzz_broker, JOBS_TOPIC, b'{"id": "\\ud800", "prompt": "hi"}', "fuzz/surrogate"
    )
    assert [a["error"]["code"] for a in answers] == ["invalid_request"]


@pytest.mark.timeout(60)
def test_a_grammar_no_token_can_satisfy_is_not_a_backend_failure(fuzz_daemon: Daemon) -> None:
    with fuzz_daemon.client(timeout=SLOW_S) as client:
        r = client.post(
            "/v1/chat/completions", json={"prompt": "hi", "max_tokens": 1, "grammar": 'root ::= "\\u0000"'}
        )
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["code"] in ("invalid_request", "invalid_output")


@pytest.mark.timeout(60)
def test_mqtt_cancel_without_an_id_is_reported(fuzz_daemon: Daemon, fuzz_broker: Broker) -> None:
    answers = publish_and_wait(fuzz_broker, CANCEL_TOPIC, b'{"job": "x"}', ERRORS_TOPIC)
    assert [a["error"]["code"] for a in answers] == ["invalid_request"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("request_", "status", "code"), SOCKET_FOUND)
def test_what_fuzzing_found_on_the_socket(
    fuzz_daemon: Daemon, request_: dict[str, Any], status: int, code: str | None
) -> None:
    model: str = fuzz_daemon.model  # type: ignore[attr-defined]
    request_ = {**request_, "body": request_["body"].replace(b"%s", model.encode())}
    with fuzz_daemon.client(timeout=SLOW_S) as client:
        response = send(client, request_)
    assert check_answer(response, request_).startswith(str(status)), response.text
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code


@pytest.mark.timeout(120)
@pytest.mark.parametrize("payload", MQTT_FOUND)
def test_what_fuzzing_found_on_mqtt(fuzz_daemon: Daemon, fuzz_broker: Broker, payload: bytes) -> None:
    answers = publish_and_wait(fuzz_broker, JOBS_TOPIC, payload, ERRORS_TOPIC, respond=False, timeout=3.0)
    assert [a["error"]["code"] for a in answers] == ["invalid_request"], answers
    assert mqtt_connected(fuzz_daemon), "the broker disconnected edged"

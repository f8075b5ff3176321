"""Answers a machine can use: JSON-schema constrained output on the real daemon and the real llama.cpp,
over the socket (raw HTTP and the official `openai` client) and over MQTT (`mosquitto_pub`), on the
embedded model and on the R1-shaped model whose chat template opens a <think> block.

Every answer is checked with the `jsonschema` package, independently of edged's own check."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from conftest import Daemon, chat, run_edged, wait_until
from mqtt_helpers import Broker, Probe

pytestmark = pytest.mark.system

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "device": {"type": "string", "maxLength": 16},
        "reading": {"type": "integer"},
        "too_warm": {"type": "boolean"},
        "level": {"enum": ["low", "normal", "high"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["device", "reading", "too_warm", "level", "tags"],
    "additionalProperties": False,
}
"""Every field bounded, so even a model with random weights completes the object in a few dozen tokens."""

ASCII_SCHEMA: dict[str, Any] = json.loads(
    json.dumps(SCHEMA)
    .replace('"maxLength": 16', '"pattern": "^[A-Za-z0-9 ._-]{0,16}$"')
    .replace('"maxLength": 8', '"pattern": "^[A-Za-z0-9 ._-]{0,8}$"')
)
"""For the model with random weights: it emits raw byte tokens, and llama.cpp's grammar counts a
sequence such as F8 80 80 80 as one character where UTF-8 (and Python) has none, so a free string can
come out invalid — edged then answers invalid_output, as it must (README, known limits). Real models
write text; printable-ASCII patterns keep this test about reasoning and schemas."""

PROMPTS = [
    f"Sensor {name} in the {room} reads {value} degrees. Describe it as JSON."
    for name, room, value in [
        ("t1", "server room", 23),
        ("t2", "kitchen", 19),
        ("hall-3", "hall", 31),
        ("b7", "basement", 12),
        ("r2", "roof", 41),
        ("lab", "lab", 25),
        ("x9", "garage", 5),
        ("w1", "workshop", 28),
        ("g4", "greenhouse", 35),
        ("c0", "cold store", -4),
    ]
] + [
    f"Is {value} °C too warm for a {place}? Answer as JSON with a level and up to three tags."
    for value, place in [
        (23, "server room"),
        (30, "bedroom"),
        (18, "office"),
        (45, "attic"),
        (8, "fridge room"),
        (27, "classroom"),
        (21, "library"),
        (33, "gym"),
        (15, "cellar"),
        (38, "boiler room"),
    ]
]


PUB = ["mosquitto_pub", "-V", "mqttv5"]
REPLY_TO = ["-D", "publish", "response-topic", "lab/answers", "-D", "publish", "correlation-data", "t-7"]


def schema_format(schema: dict[str, Any] = SCHEMA) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "reading", "schema": schema, "strict": True}}


def post(c: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return c.post("/v1/chat/completions", json=body)


def ask_all(d: Daemon, schema: dict[str, Any] = SCHEMA, **fields: Any) -> list[dict[str, Any]]:
    """The 20 prompts at once (the daemon batches them), each with the schema."""
    import concurrent.futures

    def one(prompt: str) -> dict[str, Any]:
        with d.client() as c:
            r = post(c, chat(prompt, response_format=schema_format(schema), max_tokens=400, **fields))
            assert r.status_code == 200, r.text
            return dict(r.json())

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, PROMPTS))


def test_every_answer_of_the_embedded_model_matches_the_schema(daemon: Daemon) -> None:
    answers = ask_all(daemon, temperature=0.8, seed=7)
    for answer in answers:
        message = answer["choices"][0]["message"]
        assert answer["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(message["content"], strict=False), SCHEMA)
    # Different prompts, different answers: the grammar constrains, it does not dictate.
    assert len({a["choices"][0]["message"]["content"] for a in answers}) > 10


def test_the_grammar_lets_the_model_lay_json_out_as_llama_cpp_does(daemon: Daemon) -> None:
    """llama.cpp's whitespace between JSON tokens (none, a space, or one or two newlines and up to 20
    spaces or tabs), not one optional space: greedy SmolLM2 pretty-prints its answer, as without a
    grammar; each gap stays bounded, so whitespace cannot run an answer to max_tokens."""
    with daemon.client() as c:
        for prompt in PROMPTS[:3]:
            r = post(c, chat(prompt, response_format=schema_format(SCHEMA), max_tokens=400, temperature=0))
            assert r.status_code == 200, r.text
            content = r.json()["choices"][0]["message"]["content"]
            jsonschema.validate(json.loads(content, strict=False), SCHEMA)
            assert '{\n  "' in content, content  # laid out over lines, indented
            outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', content)  # the gaps, strings taken out
            assert max(len(gap) for gap in re.findall(r"\s+", outside)) <= 22, content


@pytest.fixture
def thinker(start_daemon: Any, r1_tiny: Path) -> Daemon:
    """The daemon on the 2-layer R1-shaped model: its template ends the prompt with <think>."""
    return start_daemon(EDGED_MODEL__PATH=str(r1_tiny), EDGED_ENGINE__PARALLEL="4")


def test_a_thinking_model_reasons_freely_and_answers_to_the_schema(thinker: Daemon) -> None:
    """Random weights never close </think> on their own: a reasoning budget of 12 tokens makes edged
    close it; the reasoning is unconstrained text, the answer after it obeys the schema."""
    answers = ask_all(thinker, ASCII_SCHEMA, reasoning_budget=12, temperature=1.0, seed=3)
    for answer in answers:
        message = answer["choices"][0]["message"]
        assert message["reasoning_content"], answer  # the reasoning is there ...
        with pytest.raises(json.JSONDecodeError):
            json.loads(message["reasoning_content"])  # ... and it is not the grammar's JSON
        jsonschema.validate(json.loads(message["content"], strict=False), ASCII_SCHEMA)
        assert answer["usage"]["completion_tokens"] > 12


def test_think_false_skips_the_reasoning(thinker: Daemon) -> None:
    with thinker.client() as c:
        body = chat(PROMPTS[0], response_format=schema_format(ASCII_SCHEMA), think=False, max_tokens=300)
        r = post(c, body)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert not message.get("reasoning_content")
    jsonschema.validate(json.loads(message["content"], strict=False), ASCII_SCHEMA)


def test_the_openai_client_parses_a_pydantic_model_over_the_socket(daemon: Daemon) -> None:
    import httpx2
    import openai
    from pydantic import BaseModel, Field

    class Verdict(BaseModel):
        too_warm: bool
        level: Literal["low", "normal", "high"]
        reason: str = Field(max_length=60)

    transport = httpx2.HTTPTransport(uds=str(daemon.socket))
    with openai.OpenAI(
        base_url="http://edged/v1", api_key="unused", http_client=httpx2.Client(transport=transport)
    ) as client:
        completion = client.chat.completions.parse(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "Is 23 °C too warm for a server room?"}],
            response_format=Verdict,
            max_tokens=120,
        )
    verdict = completion.choices[0].message.parsed
    assert isinstance(verdict, Verdict)
    assert len(verdict.reason) <= 60


def test_json_object_gives_an_object(daemon: Daemon) -> None:
    with daemon.client() as c:
        # Greedy, and a prompt this small model answers briefly: an unbounded object can run on forever.
        body = chat(
            "Give a JSON object with a name and an age.",
            response_format={"type": "json_object"},
            max_tokens=300,
            temperature=0,
        )
        r = post(c, body)
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"], strict=False), dict)


def test_a_pattern_with_escaped_dots_and_anchors_is_taken(daemon: Daemon) -> None:
    """``\\.`` in a pattern is a dot, as llama.cpp's own converter writes it (llama-cpp-python's port
    wrote the literal "light\\." that llama.cpp's grammar parser refused: 400)."""
    schema = {
        "type": "object",
        "properties": {"entity_id": {"type": "string", "pattern": "^light\\.[a-z_]{1,20}$"}},
        "required": ["entity_id"],
    }
    with daemon.client() as c:
        r = post(c, chat("Name a light entity.", response_format=schema_format(schema), max_tokens=60))
    assert r.status_code == 200, r.text
    value = json.loads(r.json()["choices"][0]["message"]["content"], strict=False)
    jsonschema.validate(value, schema)
    assert value["entity_id"].startswith("light.")


def test_integer_bounds_hold_in_the_grammar_at_temperature_one(daemon: Daemon) -> None:
    """``minimum``/``maximum`` are spelled out in the grammar (as llama.cpp's converter does), not only
    checked on the answer: at temperature 1.0 every answer is in range."""
    schema = {
        "type": "object",
        "properties": {
            "minutes": {"type": "integer", "minimum": 1, "maximum": 90},
            "offset": {"type": "integer", "minimum": -5, "maximum": 5},
            "count": {"type": "integer", "exclusiveMinimum": 100},
        },
        "required": ["minutes", "offset", "count"],
    }
    with daemon.client() as c:
        for seed in range(6):
            body = chat(
                "Set a timer.",
                response_format=schema_format(schema),
                max_tokens=80,
                temperature=1.0,
                seed=seed,
            )
            r = post(c, body)
            assert r.status_code == 200, r.text
            jsonschema.validate(
                json.loads(r.json()["choices"][0]["message"]["content"], strict=False), schema
            )


def test_a_raw_grammar_constrains_the_answer(daemon: Daemon) -> None:
    grammar = 'root ::= ("yes" | "no") " because " [a-z ]{1,30} "."'
    with daemon.client() as c:
        r = post(c, chat("Is the sky blue?", grammar=grammar, max_tokens=60))
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert content.split(" because ")[0] in ("yes", "no"), content
    assert content.endswith(".")


@pytest.mark.parametrize(
    ("field", "value", "param", "says"),
    [
        ("response_format", schema_format({"type": "strnig"}), "response_format", "not a valid JSON schema"),
        ("response_format", {"type": "json_schema"}, "response_format", "needs 'json_schema'"),
        ("response_format", {"type": "xml"}, "response_format", "json_schema"),
        ("grammar", 'root ::= undefined-rule "x"', "grammar", "rejected the grammar"),
        ("grammar", 'answer ::= "x"', "grammar", "no 'root' rule"),
    ],
)
def test_a_bad_schema_or_grammar_is_refused_before_queueing(
    daemon: Daemon, field: str, value: Any, param: str, says: str
) -> None:
    with daemon.client() as c:
        before = c.get("/status").json()["engine"]["jobs"]
        r = post(c, chat("hello", **{field: value}))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request"
        assert says in error["message"]
        assert param in (error["param"] or "") + error["message"]
        assert c.get("/status").json()["engine"]["jobs"] == before  # never queued, never run


def test_an_answer_cut_by_max_tokens_is_invalid_output_not_half_an_object(daemon: Daemon) -> None:
    with daemon.client() as c:
        r = post(c, chat(PROMPTS[0], response_format=schema_format(), max_tokens=4))
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_output"
        assert error["finish_reason"] == "length"
        assert "max_tokens (4)" in error["message"]
        assert error["content"].startswith("{")  # what was generated, clearly marked as not valid
        streamed = c.post(
            "/v1/chat/completions",
            json=chat(PROMPTS[0], response_format=schema_format(), max_tokens=4, stream=True),
        )
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "invalid_output"
        assert all(e.get("choices", [{}])[0].get("finish_reason") is None for e in events[:-1])


def test_a_deadline_during_a_constrained_answer_is_invalid_output(thinker: Daemon) -> None:
    with thinker.client() as c:
        r = post(c, chat(PROMPTS[1], response_format=schema_format(), max_tokens=1500, timeout_s=1.5))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_output"
    assert "deadline" in r.json()["error"]["message"]


def test_status_says_structured_output_is_available(daemon: Daemon) -> None:
    with daemon.client() as c:
        post(c, chat(PROMPTS[0], response_format=schema_format(), max_tokens=300))
        post(c, chat(PROMPTS[0], response_format=schema_format(), max_tokens=300))
        status = c.get("/status").json()["engine"]["structured_output"]
    assert status["available"] is True
    assert status["reason"] is None
    assert status["schema_cache"]["hits"] >= 1  # the same schema is converted once
    assert status["tools"] == {"tool_choice": ["none", "auto", "required", "named"], "reason": None}


def test_the_parsed_object_arrives_over_mqtt(start_daemon: Any, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    try:
        d = start_daemon(
            EDGED_MQTT__HOST="127.0.0.1", EDGED_MQTT__PORT=str(broker.port), EDGED_DEVICE_ID="thermo"
        )
        with d.client() as c:
            wait_until(lambda: (c.get("/status").json()["mqtt"] or {}).get("connected"), 20, "connected")
        probe = Probe(broker.port)  # subscribes and waits for the broker's SUBACK: no sleep needed
        try:
            probe.subscribe("lab/answers")
            job = {"id": "t-1", "prompt": PROMPTS[0], "response_format": schema_format(), "max_tokens": 300}
            subprocess.run(
                [*PUB, "-p", str(broker.port), "-t", "edged/thermo/jobs", "-m", json.dumps(job), *REPLY_TO],
                check=True,
                timeout=10,
            )
            _, answer, props = probe.next(70)
        finally:
            probe.close()
        assert props.CorrelationData == b"t-7"
        assert answer["status"] == "done", answer
        jsonschema.validate(answer["parsed"], SCHEMA)
        assert answer["parsed"] == json.loads(answer["content"], strict=False)
    finally:
        broker.stop()


def test_edged_ask_with_a_schema_file(daemon: Daemon, tmp_path: Path) -> None:
    schema_file = tmp_path / "reading.json"
    schema_file.write_text(json.dumps(SCHEMA))
    socket = str(daemon.socket)
    done = run_edged("ask", "--socket", socket, "--schema", str(schema_file), "--json", PROMPTS[3])
    assert done.returncode == 0, done.stderr
    content = json.loads(done.stdout)["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content, strict=False), SCHEMA)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    refused = run_edged("ask", "--socket", socket, "--schema", str(bad), "hi")
    assert refused.returncode == 2 and "not a JSON file" in refused.stderr

"""Issue 22, the journal and ownership half: one crafted job never takes the board down (over MQTT
it is refused before it is journaled; a journaled poison is answered, not replayed forever), the
crash-loop breaker, job ids that belong to their requester on MQTT and TCP, reply topics that
cannot point into edged's own namespace, the MQTT v5 Maximum Packet Size. Real daemon, real model,
real Mosquitto, real kill -9."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, wait_until
from mqtt_helpers import Broker, Probe, free_port

from edged.journal import Journal, JournalEntry

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

WAIT = 30
BOMB = {"type": "string", "maxLength": 100000}
"""The 40-byte schema that segfaulted the daemon: now its maximum is left out of the grammar (no
context holds 100,000 characters) and checked on the answer."""
MIN_BOMB = {"type": "string", "minLength": 100000}
"""Its twin that no answer can satisfy: refused."""
DEEP_NOT: dict[str, Any] = {"type": "string"}
for _ in range(150):
    DEEP_NOT = {"not": DEEP_NOT}


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def mqtt_env(broker: Broker, device: str, journal: Path | None = None, **extra: str) -> dict[str, str]:
    env = {
        "EDGED_MQTT__HOST": "127.0.0.1",
        "EDGED_MQTT__PORT": str(broker.port),
        "EDGED_DEVICE_ID": device,
        "EDGED_MQTT__RECONNECT_MAX_S": "1",
        **extra,
    }
    if journal is not None:
        env["EDGED_JOURNAL__PATH"] = str(journal)
    return env


def connected(d: Daemon) -> bool:
    with d.client(timeout=5) as c:
        mqtt = c.get("/status").json()["mqtt"]
        return bool(mqtt and mqtt["connected"])


def rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT job_id, origin, state, attempts, error FROM jobs")]


def tool_job(job_id: str, schema: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return {
        "id": job_id,
        "prompt": "Call f.",
        "max_tokens": 8,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}],
        "tool_choice": "required",
    }


def schema_job(job_id: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job_id,
        "prompt": "Name a colour.",
        "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }


# -- one crafted job never takes the board down -----------------------------------------------------


def test_a_schema_bomb_over_mqtt_is_refused_before_the_journal(start_daemon, broker: Broker, tmp_path: Path):
    """A minLength of 100,000 and the 150-deep `not` that raised RecursionError: each answered
    invalid_request on its reply topic, never journaled as runnable; the 40-byte maxLength schema
    that segfaulted the daemon is run and answered. The same daemon answers the next job and
    survives a restart with nothing to replay."""
    journal = tmp_path / "journal.sqlite3"
    d = start_daemon(**mqtt_env(broker, "bomb", journal))
    wait_until(lambda: connected(d), 20, "edged connected")
    with d.client() as c:
        pid = c.get("/status").json()["pid"]
    probe = Probe(broker.port)
    try:
        probe.subscribe("lab/bomb")
        for job_id, schema in (("bomb-1", MIN_BOMB), ("bomb-2", DEEP_NOT)):
            probe.publish("edged/bomb/jobs", schema_job(job_id, schema), response_topic="lab/bomb")
            _, final = probe.until_final(30)
            assert final["id"] == job_id and final["status"] == "error", final
            assert final["error"]["code"] == "invalid_request", final
            assert final["error"]["param"].startswith("response_format.json_schema.schema"), final
        tool_bombs = (("tool-bomb-1", MIN_BOMB), ("tool-bomb-2", DEEP_NOT), ("tool-bomb-3", {"type": "text"}))
        for job_id, schema in tool_bombs:  # a tool's schema too, bounded and then converted
            probe.publish("edged/bomb/jobs", tool_job(job_id, schema), response_topic="lab/bomb")
            _, final = probe.until_final(30)
            assert final["id"] == job_id and final["status"] == "error", final
            assert final["error"]["code"] == "invalid_request", final
            assert final["error"]["param"].startswith("tools[0].function.parameters"), final
        probe.publish("edged/bomb/jobs", schema_job("bomb-3", BOMB), response_topic="lab/bomb")
        _, final = probe.until_final(60)
        assert final["id"] == "bomb-3", final
        assert final["status"] == "done" or final["error"]["code"] == "invalid_output", final  # 8 tokens
        probe.publish(
            "edged/bomb/jobs",
            {"id": "after", "prompt": "Say hi.", "max_tokens": 4},
            response_topic="lab/bomb",
        )
        _, final = probe.until_final(60)
        assert final["id"] == "after" and final["status"] == "done", final
        with d.client() as c:
            assert c.get("/status").json()["pid"] == pid, "the same process answered"
    finally:
        probe.close()
    assert d.stop() == 0, d.log()
    states = {r["job_id"]: r["state"] for r in rows(journal)}
    refused = {"bomb-1", "bomb-2", "tool-bomb-1", "tool-bomb-2", "tool-bomb-3"}
    assert not refused & set(states), f"refused jobs were journaled: {states}"
    d2 = start_daemon(**mqtt_env(broker, "bomb", journal))
    wait_until(lambda: connected(d2), 20, "edged connected again")
    assert d2.proc is not None and d2.proc.poll() is None


def test_a_journaled_poison_is_answered_and_the_other_pending_jobs_run(
    start_daemon, broker: Broker, tmp_path: Path
) -> None:
    """Rows an older edged journaled before checking them (a 100,000-minLength bomb, the 150-deep
    schema, the 100,000-maxLength one), between two ordinary jobs, all pending after a kill: the
    start answers the first two invalid_request, runs the others; the daemon stays up. (Before:
    SIGSEGV at every start, or a RecursionError that skipped every later row.)"""
    journal_path = tmp_path / "journal.sqlite3"
    jobs = [
        ("first", {"id": "first", "prompt": "Say one.", "max_tokens": 4}),
        ("poison-1", schema_job("poison-1", MIN_BOMB)),
        ("poison-2", schema_job("poison-2", DEEP_NOT)),
        ("clamped", schema_job("clamped", BOMB)),
        ("last", {"id": "last", "prompt": "Say two.", "max_tokens": 4}),
    ]
    with Journal.open(journal_path) as journal:
        for job_id, body in jobs:
            entry = JournalEntry(
                origin="mqtt",
                payload=json.dumps(body).encode(),
                job_id=job_id,
                response_topic="lab/poison",
                owner="lab/poison",
                qos=1,
            )
            key = journal.accept(entry).result(WAIT).record.key
            journal.mark_running(key).result(WAIT)  # the daemon was working on them when it died
    probe = Probe(broker.port)
    try:
        probe.subscribe("lab/poison")
        d = start_daemon(**mqtt_env(broker, "poison", journal_path))
        finals = {m["id"]: m for m in probe.finals(5, timeout=120)}
        assert finals["first"]["status"] == "done" and finals["last"]["status"] == "done", finals
        clamped = finals["clamped"]
        assert clamped["status"] == "done" or clamped["error"]["code"] == "invalid_output", clamped
        for job_id in ("poison-1", "poison-2"):
            assert finals[job_id]["status"] == "error", finals[job_id]
            assert finals[job_id]["error"]["code"] == "invalid_request", finals[job_id]
        assert d.proc is not None and d.proc.poll() is None, d.log()
    finally:
        probe.close()
    assert d.stop() == 0, d.log()
    assert {r["state"] for r in rows(journal_path)} == {"answered"}


def test_a_job_the_daemon_died_in_three_times_is_answered_failed(
    start_daemon, broker: Broker, tmp_path: Path
) -> None:
    """journal.max_attempts (3): kill -9 three times while the same job streams; the fourth start
    answers it backend_failed, naming the attempts, instead of running it a fourth time."""
    journal = tmp_path / "journal.sqlite3"
    env = mqtt_env(broker, "loop", journal, EDGED_ENGINE__PARALLEL="1")
    probe = Probe(broker.port, client_id="loop-collector", persistent=True)
    long_job = {
        "id": "long",
        "prompt": "Count from one to one thousand.",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        probe.subscribe("lab/loop")
        d = start_daemon(**env)
        wait_until(lambda: connected(d), 20, "edged connected")
        probe.publish("edged/loop/jobs", long_job, response_topic="lab/loop")
        for attempt in range(1, 4):
            while True:  # until this run of the job streams
                _, message, _ = probe.next(120)
                assert "status" not in message, f"run {attempt} finished before the kill: {message}"
                if message.get("seq", -1) >= 2:
                    break
            assert d.proc is not None
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            attempts = {r["job_id"]: r["attempts"] for r in rows(journal)}
            assert attempts["long"] == attempt, attempts
            probe.quiet(0.2)  # chunks of the killed run still in flight
            d = start_daemon(**env)
            if attempt < 3:
                wait_until(lambda d=d: connected(d), 20, "edged connected again")
        while True:
            _, message, _ = probe.next(60)
            if "status" in message:
                break
        assert message["id"] == "long" and message["status"] == "error", message
        assert message["error"]["code"] == "backend_failed", message
        assert "3 times" in message["error"]["message"] and "max_attempts" in message["error"]["message"]
        assert d.proc is not None and d.proc.poll() is None
    finally:
        probe.close()
    assert d.stop() == 0, d.log()
    (row,) = [r for r in rows(journal) if r["job_id"] == "long"]
    assert row["state"] == "answered" and row["attempts"] == 3, row


def test_socket_rows_left_open_are_closed_at_every_start_without_mqtt(start_daemon, tmp_path: Path) -> None:
    """Journal recovery runs with or without MQTT: socket/TCP rows a crash left accepted/running are
    closed failed (their clients are gone), their unacknowledged answers closed answered."""
    journal_path = tmp_path / "journal.sqlite3"
    with Journal.open(journal_path) as journal:
        keys = []
        for n, origin in enumerate(("socket", "tcp:webui", "socket")):
            entry = JournalEntry(origin=origin, payload=b"", job_id=f"local-{n}", owner=origin)
            keys.append(journal.accept(entry).result(WAIT).record.key)
        journal.mark_running(keys[1]).result(WAIT)
        journal.mark_done(keys[2], {"id": "local-2", "status": "done"}).result(WAIT)
    d = start_daemon(EDGED_JOURNAL__PATH=str(journal_path))
    with d.client() as c:
        states = {}
        for n in range(3):
            response = c.get(f"/v1/jobs/local-{n}")
            assert response.status_code == 200, response.text
            states[n] = response.json()
    assert states[0]["state"] == "answered" and states[0]["error"]["code"] == "cancelled", states[0]
    assert states[1]["state"] == "answered" and states[1]["error"]["code"] == "cancelled", states[1]
    assert states[2]["state"] == "answered" and states[2]["error"] is None, states[2]


# -- job ids belong to their requester --------------------------------------------------------------


@pytest.mark.parametrize("journal", ["on", "off"])
def test_two_requesters_reusing_an_id_each_get_their_own_answer(
    start_daemon, broker: Broker, tmp_path: Path, journal: str
) -> None:
    """A publishes id shared-1 and gets its answer; B then publishes shared-1 with its own response
    topic: B's prompt runs and B gets B's answer, never A's ("duplicate"). And the other way round:
    an id claimed first by B does not hand B's answer to A."""
    env = mqtt_env(
        broker,
        "ids",
        tmp_path / "journal.sqlite3",
        EDGED_JOURNAL__ENABLED="true" if journal == "on" else "false",
    )
    d = start_daemon(**env)
    wait_until(lambda: connected(d), 20, "edged connected")
    a, b = Probe(broker.port), Probe(broker.port)
    try:
        a.subscribe("replies/a/#")
        b.subscribe("replies/b/#")
        secret = {
            "id": "shared-1",
            "prompt": "Repeat exactly: the vault code is 4711",
            "max_tokens": 12,
            "seed": 1,
        }
        a.publish("edged/ids/jobs", secret, response_topic="replies/a/x", correlation=b"a-1")
        _, answer_a = a.until_final(60)
        assert answer_a["status"] == "done"
        b.publish(
            "edged/ids/jobs",
            {"id": "shared-1", "prompt": "Say: hello", "max_tokens": 12, "seed": 1},
            response_topic="replies/b/y",
            correlation=b"b-1",
        )
        _, answer_b = b.until_final(60)
        assert answer_b["status"] == "done" and not answer_b.get("duplicate"), answer_b
        assert answer_b["usage"]["prompt_tokens"] != answer_a["usage"]["prompt_tokens"], "B's own prompt ran"
        # The owner's own redelivery is still recognised (journal: from the row; memory: the job).
        a.publish("edged/ids/jobs", secret, response_topic="replies/a/x", correlation=b"a-1")
        _, again = a.until_final(60)
        assert again.get("duplicate") is True and again["content"] == answer_a["content"], again
        # Pre-claim: B sends "next-1" first; A's "next-1" still runs A's prompt.
        b.publish(
            "edged/ids/jobs",
            {"id": "next-1", "prompt": "Say: no", "max_tokens": 4},
            response_topic="replies/b/y",
        )
        b.until_final(60)
        a.publish(
            "edged/ids/jobs", {**secret, "id": "next-1"}, response_topic="replies/a/x", correlation=b"a-2"
        )
        _, claimed = a.until_final(60)
        assert not claimed.get("duplicate"), claimed
        assert claimed["usage"]["prompt_tokens"] == answer_a["usage"]["prompt_tokens"], "A's prompt ran"
        assert b.quiet(0.5) == [], "B received nothing of A's"
    finally:
        a.close()
        b.close()


def test_a_cancel_reaches_only_the_requesters_own_job(start_daemon, broker: Broker, tmp_path: Path) -> None:
    """A cancel names a job by id and the reply topic the requester is answered on: B's cancel of
    A's job (same id, B's topic or none) is not_found; A's own cancel works."""
    d = start_daemon(**mqtt_env(broker, "cx", tmp_path / "journal.sqlite3", EDGED_ENGINE__PARALLEL="1"))
    wait_until(lambda: connected(d), 20, "edged connected")
    a, errors = Probe(broker.port), Probe(broker.port)
    try:
        a.subscribe("replies/a/#")
        errors.subscribe("edged/cx/errors")
        a.publish(
            "edged/cx/jobs",
            {
                "id": "long-a",
                "prompt": "Count to a thousand.",
                "max_tokens": 1500,
                "ignore_eos": True,
                "stream": True,
            },
            response_topic="replies/a/x",
        )
        _, first, _ = a.next(60)
        assert first.get("seq") == 0, first
        errors.publish("edged/cx/cancel", {"id": "long-a"})  # the default topic: not A's
        _, refused, _ = errors.next(30)
        assert refused["error"]["code"] == "not_found", refused
        errors.publish("edged/cx/cancel", {"id": "long-a", "reply_to": "replies/b/y"})
        _, refused, _ = errors.next(30)
        assert refused["error"]["code"] == "not_found", refused
        a.publish("edged/cx/cancel", {"id": "long-a"}, response_topic="replies/a/x")
        _, final = a.until_final(60)
        assert final["status"] == "error" and final["error"]["code"] == "cancelled", final
    finally:
        a.close()
        errors.close()


def test_bombs_over_tcp_are_refused_and_the_daemon_keeps_serving(start_daemon) -> None:
    """The keyed LAN listener: the 40-byte schema, 150 nested ``not``s, Ollama's ``format`` and a
    30,000-deep raw grammar are each a 400 naming their field; the same process answers next."""
    port = free_port()
    key = "sk-lan-0123456789abcdef0123"
    d = start_daemon(EDGED_HTTP__LISTEN=f"127.0.0.1:{port}", EDGED_HTTP__API_KEYS=json.dumps({"lan": key}))
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120) as lan:
        model = lan.get("/v1/models").json()["data"][0]["id"]
        pid = d.proc.pid if d.proc else None

        def openai(**extra: Any) -> httpx.Response:
            body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, **extra}
            return lan.post("/v1/chat/completions", json=body)

        for schema in (MIN_BOMB, DEEP_NOT):
            r = openai(
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"].startswith("response_format.json_schema.schema"), r.text
        r = openai(grammar="root ::= " + "(" * 30000 + '"a"' + ")" * 30000)
        assert r.status_code == 400 and r.json()["error"]["param"] == "grammar", r.text
        assert "nests parentheses" in r.json()["error"]["message"], r.text
        r = lan.post(
            "/api/chat",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "hi"}],
                "format": {"type": "array", "items": {}, "minItems": 10**7},
                "stream": False,
            },
        )
        assert r.status_code == 400 and "minItems" in r.json()["error"], r.text
        clamped = openai(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": BOMB}}
        )
        assert clamped.status_code in (200, 422), clamped.text  # a maximum no context holds: answered
        assert openai().status_code == 200
    assert d.proc is not None and d.proc.poll() is None and d.proc.pid == pid


def test_a_second_key_cannot_read_or_cancel_another_keys_job(start_daemon, tmp_path: Path) -> None:
    """TCP with two keys: 404 for the other key's job (running and journaled), as for an unknown
    one; its own key and the local socket see it."""
    port = free_port()
    keys = {"alice": "sk-alice-0123456789abcdef", "bob": "sk-bob-0123456789abcdef00"}
    d = start_daemon(
        EDGED_HTTP__LISTEN=f"127.0.0.1:{port}",
        EDGED_HTTP__API_KEYS=json.dumps(keys),
        EDGED_ENGINE__PARALLEL="1",
    )
    base = f"http://127.0.0.1:{port}"

    def client(name: str) -> httpx.Client:
        return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys[name]}"}, timeout=120)

    with client("alice") as alice, client("bob") as bob, d.client() as local:
        with alice.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "id": "alice-job",
                "messages": [{"role": "user", "content": "Count to a thousand."}],
                "max_tokens": 1500,
                "ignore_eos": True,
                "stream": True,
            },
        ) as stream:
            next(stream.iter_lines())  # running
            assert bob.get("/v1/jobs/alice-job").status_code == 404
            assert bob.post("/v1/jobs/alice-job/cancel").status_code == 404
            assert alice.get("/v1/jobs/alice-job").json()["state"] == "running"
            assert local.get("/v1/jobs/alice-job").json()["state"] == "running"
            assert alice.post("/v1/jobs/alice-job/cancel").status_code == 200
            wait_until(lambda: alice.get("/v1/jobs/alice-job").json()["state"] == "cancelled", 30)
        wait_until(
            lambda: local.get("/v1/jobs/alice-job").json().get("state") in ("answered", "cancelled"), 30
        )
        assert bob.get("/v1/jobs/alice-job").status_code == 404, "journaled: still not bob's"
        assert alice.get("/v1/jobs/alice-job").status_code == 200


def test_telemetry_carries_no_job_id(start_daemon, broker: Broker, tmp_path: Path) -> None:
    d = start_daemon(**mqtt_env(broker, "tel", tmp_path / "j.sqlite3", EDGED_TELEMETRY__INTERVAL_S="1"))
    wait_until(lambda: connected(d), 20, "edged connected")
    probe = Probe(broker.port)
    try:
        probe.subscribe("replies/t/#")
        probe.subscribe("edged/tel/telemetry")
        probe.publish(
            "edged/tel/jobs",
            {"id": "private-42", "prompt": "Hi", "max_tokens": 4},
            response_topic="replies/t/x",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            topic, message, _ = probe.next(30)
            if topic.endswith("/telemetry") and message.get("last_job"):
                assert "private-42" not in json.dumps(message), message["last_job"]
                assert message["last_job"]["usage"]["completion_tokens"] > 0
                return
        pytest.fail("no telemetry with last_job within 60 s")
    finally:
        probe.close()


# -- reply topics and packet size ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "topic"),
    [
        ("response_topic", "edged/rt/results/victim-job"),
        ("response_topic", "edged/rt/status"),
        ("reply_to", "edged/rt/jobs"),
        ("reply_to", "homeassistant/sensor/edged_rt/x/config"),
        ("response_topic", "replies/" + "x" * 2000),
    ],
)
def test_reply_topics_cannot_point_into_edgeds_own_namespace(
    start_daemon, broker: Broker, tmp_path: Path, form: str, topic: str
) -> None:
    d = start_daemon(**mqtt_env(broker, "rt", tmp_path / "j.sqlite3"))
    wait_until(lambda: connected(d), 20, "edged connected")
    watcher = Probe(broker.port)
    try:
        watcher.subscribe("edged/rt/#")
        watcher.subscribe("homeassistant/#")
        job: dict[str, Any] = {"id": "steer", "prompt": "Say: forged", "max_tokens": 4}
        if form == "reply_to":
            job["reply_to"] = topic
            watcher.publish("edged/rt/jobs", job)
        else:
            watcher.publish("edged/rt/jobs", job, response_topic=topic)
        deadline = time.monotonic() + 30
        seen: list[tuple[str, dict[str, Any]]] = []
        while time.monotonic() < deadline:
            got, message, _ = watcher.next(30)
            seen.append((got, message))
            if got == "edged/rt/errors":
                assert message["error"]["code"] == "invalid_request", message
                break
        else:
            pytest.fail(f"no error on edged/rt/errors: {seen}")
        late = watcher.quiet(1.0)
        assert not [m for t, m in seen if t != "edged/rt/errors" and "status" in m and m.get("id") == "steer"]
        assert not [m for m in late if m.get("id") == "steer"], late
    finally:
        watcher.close()


def test_the_broker_never_delivers_a_message_over_the_packet_limit(
    start_daemon, broker: Broker, tmp_path: Path
):
    """Maximum Packet Size in CONNECT (jobs.max_payload_bytes + headroom): a 2 MiB job never
    reaches edged (today it is read into memory, then refused payload_too_large)."""
    d = start_daemon(
        **mqtt_env(broker, "big", tmp_path / "j.sqlite3", EDGED_JOBS__MAX_PAYLOAD_BYTES="1048576")
    )
    wait_until(lambda: connected(d), 20, "edged connected")
    probe = Probe(broker.port)
    try:
        probe.subscribe("edged/big/errors")
        probe.subscribe("replies/big/#")
        probe.publish("edged/big/jobs", "x" * (2 * 1024 * 1024), response_topic="replies/big/x")
        probe.publish(
            "edged/big/jobs", {"id": "small", "prompt": "Hi", "max_tokens": 4}, response_topic="replies/big/x"
        )
        _, final = probe.until_final(60)
        assert final["id"] == "small" and final["status"] == "done", final
        assert probe.quiet(1.0) == []
    finally:
        probe.close()


def test_the_rate_limit_identity_is_the_topic_the_acl_binds_not_a_claim(
    start_daemon, broker: Broker, tmp_path: Path
) -> None:
    """mqtt.rate_per_min = 2. Jobs on edged/<id>/jobs/alice are alice's (the broker's ACL binds
    that level to the login); someone claiming `client_id = alice` on the plain jobs topic has a
    bucket of their own and cannot drain hers, nor escape theirs by rotating reply topics."""
    d = start_daemon(**mqtt_env(broker, "rl2", tmp_path / "j.sqlite3", EDGED_MQTT__RATE_PER_MIN="2"))
    wait_until(lambda: connected(d), 20, "edged connected")
    probe = Probe(broker.port)
    try:
        probe.subscribe("replies/#")
        for i in range(3):  # a claimant: two pass, the third is limited
            props_claim = {"id": f"claim-{i}", "prompt": "hi", "max_tokens": 1}
            probe.client.publish(
                "edged/rl2/jobs",
                json.dumps(props_claim),
                qos=1,
                properties=_claiming("alice", f"replies/claim/{i}"),
            ).wait_for_publish(10)
        for i in range(2):  # alice herself, on her own topic: her bucket is untouched
            probe.publish(
                "edged/rl2/jobs/alice",
                {"id": f"alice-{i}", "prompt": "hi", "max_tokens": 1},
                response_topic=f"replies/alice/{i}",
            )
        finals = {m["id"]: m for m in probe.finals(5)}
    finally:
        probe.close()
    assert [i for i, m in sorted(finals.items()) if m["status"] == "error"] == ["claim-2"], finals
    assert finals["claim-2"]["error"]["code"] == "rate_limited"
    assert finals["alice-0"]["status"] == finals["alice-1"]["status"] == "done"


def _claiming(client_id: str, response_topic: str) -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.UserProperty = [("client_id", client_id)]
    return props

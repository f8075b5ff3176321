"""The MQTT transport's pure parts: a payload as a job, where answers may be published, whose a job
topic is, and who a job counts for in the rate limit."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from edged.errors import InvalidRequest, PayloadTooLarge
from edged.transports.mqtt import MAX_TOPIC_BYTES, Topics, _client_of, check_reply_topic, parse_job

LIMIT = 4096
TOPICS = Topics.build("edged", "dev1", "grp")


def as_job(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# -- parse_job -------------------------------------------------------------------------------------


def test_a_plain_text_payload_is_a_prompt() -> None:
    job, reply_to = parse_job("Wie warm ist es, \u00fcberall?\n".encode(), LIMIT)
    assert (job.prompt, job.messages, reply_to) == ("Wie warm ist es, \u00fcberall?\n", None, None)
    job, _ = parse_job(b'"a JSON string is a prompt too"', LIMIT)
    assert job.prompt == "a JSON string is a prompt too"


def test_a_json_object_is_a_job_and_reply_to_is_taken_out_of_it() -> None:
    doc = {"id": "j1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "reply_to": "r/me"}
    job, reply_to = parse_job(as_job(doc), LIMIT)
    assert (job.id, job.max_tokens, reply_to) == ("j1", 8, "r/me")
    assert job.messages is not None and job.messages[0].content == "hi"


def test_the_size_limit_is_checked_before_anything_is_parsed() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        parse_job(b"[" * (LIMIT + 1), LIMIT)
    assert info.value.http_status == 413 and f"limit of {LIMIT} bytes" in info.value.message
    assert parse_job(b"x" * LIMIT, LIMIT)[0].prompt == "x" * LIMIT


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"\xff\xfehello", "not valid UTF-8 (byte 0)"),
        (b"  \n\t", "empty payload"),
        (b"", "empty payload"),
        (b"{not json", "malformed JSON"),
        (b"[" * 2000 + b"]" * 2000, "malformed JSON"),  # deeper than the parser goes
        (b'{"prompt": "\\ud800"}', "malformed JSON"),  # a lone surrogate: no text to tokenize or publish
        (b"[1, 2]", "a JSON object or a plain-text prompt"),
        (b'{"prompt": "hi", "max_tokens": "5"}', "invalid job: max_tokens"),
        (b'{"prompt": "hi", "colour": 1}', "invalid job: colour: Extra inputs"),
        (b"{}", "invalid job: job: Value error, give exactly one"),
    ],
)
def test_what_is_no_job_is_invalid_request_naming_the_problem(payload: bytes, says: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_job(payload, LIMIT)
    assert info.value.code == "invalid_request"
    assert says in info.value.message, info.value.message


def test_a_bad_reply_to_refuses_the_job() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_job(as_job({"prompt": "hi", "reply_to": "replies/#"}), LIMIT)
    assert info.value.param == "reply_to"


# -- check_reply_topic -----------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["replies/a", "r", "replies/caf\u00e9/\u6e29\u5ea6", "a" * MAX_TOPIC_BYTES])
def test_topics_a_broker_takes_are_fine(topic: str) -> None:
    assert check_reply_topic(topic, "reply_to") == topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "$SYS/broker",  # the broker's own
        "replies/+",
        "replies/#",
        "a" * (MAX_TOPIC_BYTES + 1),
        "\u00e9" * (MAX_TOPIC_BYTES // 2 + 1),  # the limit is in UTF-8 bytes, not characters
        "replies/\x00",
        "replies/\n",
        "replies/\x85",  # C1 control
        "replies/\ud800",  # a lone surrogate cannot be encoded
        "replies/\ufdd0",  # non-characters the broker disconnects for
        "replies/\uffff",
        "replies/\U0001fffe",
        7,
        None,
        b"replies/a",
    ],
)
def test_topics_the_broker_would_refuse_or_never_deliver_are_refused(topic: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_reply_topic(topic, "Response Topic")
    assert info.value.param == "Response Topic"


def test_reserved_prefixes_are_not_a_requesters_to_be_answered_on() -> None:
    reserved = ("edged", "homeassistant")
    for topic in ("edged", "edged/dev1/results/x", "homeassistant/sensor/config"):
        with pytest.raises(InvalidRequest, match="edged's or Home Assistant's own"):
            check_reply_topic(topic, "reply_to", reserved)
    for topic in ("edgedx/results", "replies/edged", "home/assistant"):  # a prefix is whole levels
        assert check_reply_topic(topic, "reply_to", reserved) == topic


# -- Topics ----------------------------------------------------------------------------------------


def test_the_topics_of_a_device() -> None:
    t = Topics.build("site/edged", "dev1", "grp")
    assert (t.jobs, t.results, t.cancel) == (
        "site/edged/dev1/jobs",
        "site/edged/dev1/results",
        "site/edged/dev1/cancel",
    )
    assert t.fleet == "site/edged/fleet/jobs"
    assert t.fleet_subscription == "$share/grp/site/edged/fleet/jobs"
    assert (t.user_jobs, t.fleet_user_subscription) == (f"{t.jobs}/+", f"{t.fleet_subscription}/+")


@pytest.mark.parametrize(
    ("topic", "user"),
    [
        ("edged/dev1/jobs/alice", "alice"),
        ("edged/fleet/jobs/bob", "bob"),
        ("edged/dev1/jobs", None),  # the shared jobs topic names nobody
        ("edged/dev1/jobs/", None),
        ("edged/dev1/jobs/a/b", None),  # one level only: what the ACL's %u binds
        ("edged/dev2/jobs/alice", None),  # another device's
        ("edged/dev1/jobsx/alice", None),
        ("edged/dev1/cancel/alice", None),
    ],
)
def test_user_of_a_job_topic(topic: str, user: str | None) -> None:
    assert TOPICS.user_of(topic) == user
    assert TOPICS.is_job_topic(topic) == (user is not None or topic == TOPICS.jobs)


def test_the_shared_topics_are_job_topics_too() -> None:
    assert TOPICS.is_job_topic("edged/dev1/jobs") and TOPICS.is_job_topic("edged/fleet/jobs")
    assert not TOPICS.is_job_topic("edged/dev1/results")


# -- who a job counts for in the rate limit ---------------------------------------------------------


def message(topic: str, *, client_id: str | None = None, response_topic: str | None = None) -> Any:
    props = SimpleNamespace(
        UserProperty=[("client_id", client_id)] if client_id is not None else [],
        ResponseTopic=response_topic,
    )
    return SimpleNamespace(topic=topic, properties=props)


def test_the_user_topic_beats_every_claim_in_the_message() -> None:
    """The broker binds ``<jobs>/<user>`` to the authenticated user; the rest are claims, each in its
    own namespace, so no claim can reach (and drain) an authenticated user's bucket."""
    claims = {"client_id": "alice", "response_topic": "user:alice"}
    assert _client_of(message("edged/dev1/jobs/alice", **claims), "r/x", TOPICS) == "user:alice"
    assert _client_of(message("edged/dev1/jobs", **claims), "r/x", TOPICS) == "client:alice"
    assert _client_of(message("edged/dev1/jobs", response_topic="r/mine"), "r/x", TOPICS) == "topic:r/mine"
    assert _client_of(message("edged/dev1/jobs"), "r/x", TOPICS) == "topic:r/x"
    assert _client_of(message("edged/dev1/jobs", client_id=""), None, TOPICS) == "anonymous"
    assert _client_of(SimpleNamespace(topic="edged/dev1/jobs"), None, TOPICS) == "anonymous"  # MQTT 3.1.1

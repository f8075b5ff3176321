"""The TCP listener's gate, in-process: API keys (stored hashed), the rate limit per key or client
(the bucket itself: test_ratelimit.py), what TCP never serves, and errors in the shape each route's
clients read."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from edged.config import HttpConfig
from edged.errors import ConfigError
from edged.transports.tcp import Caller, KeyGate, hash_key, load_keys

from .conftest import Clock

KEY = "k3y-for-the-kitchen-tablet"


# -- keys ------------------------------------------------------------------------------------------


def test_keys_are_kept_as_sha256_and_a_given_hash_is_taken_as_is(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"another-long-key-1234").hexdigest()
    config = HttpConfig(api_keys={"ha": SecretStr(KEY), "ci": SecretStr("sha256:" + digest.upper())})
    keys = load_keys(config)
    assert keys == {"ha": hash_key(KEY), "ci": "sha256:" + digest}
    assert hash_key(KEY) == "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()
    assert KEY not in json.dumps(keys)


def test_a_keys_file_with_comments_and_its_mistakes_by_line(tmp_path: Path) -> None:
    good = tmp_path / "keys"
    good.write_text(f"# the kitchen\nkitchen {KEY}  # its tablet\n\nci sha256:{'ab' * 32}\n")
    assert load_keys(HttpConfig(api_keys_file=good)) == {
        "kitchen": hash_key(KEY),
        "ci": "sha256:" + "ab" * 32,
    }
    bad = tmp_path / "bad-keys"
    bad.write_text(f"kitchen {KEY} extra\nci sha256:abc\n")
    with pytest.raises(ConfigError) as info:
        load_keys(HttpConfig(api_keys_file=bad))
    assert info.value.problems == [
        f"{bad}:1: expected 'NAME KEY' or 'NAME sha256:<hex>'",
        f"{bad}:2: key 'ci': sha256 needs 64 hex digits",
    ]
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    with pytest.raises(ConfigError, match="holds no keys"):
        load_keys(HttpConfig(api_keys_file=empty))
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys(HttpConfig(api_keys_file=tmp_path / "missing"))


# -- the gate --------------------------------------------------------------------------------------


def call(gate: KeyGate, path: str, *headers: tuple[str, str], client: str = "192.0.2.10") -> dict[str, Any]:
    """One HTTP request through ``gate``: its status, headers and JSON body (None if the app answered)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": (client, 50000),
    }
    asyncio.run(gate(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return {
        "status": start["status"],
        "headers": {k.decode(): v.decode() for k, v in start["headers"]},
        "body": json.loads(body) if body else None,
    }


def gate_for(config: HttpConfig) -> tuple[KeyGate, list[Caller | None]]:
    reached: list[Caller | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope["state"].get("edged_caller"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return KeyGate(app, config, load_keys(config)), reached


def keyed(**extra: Any) -> HttpConfig:
    return HttpConfig(listen="0.0.0.0:8080", api_keys={"kitchen": SecretStr(KEY)}, **extra)


def test_a_request_passes_with_its_key_and_the_app_learns_whose_it_is() -> None:
    gate, reached = gate_for(keyed())
    assert call(gate, "/v1/models", ("Authorization", f"Bearer {KEY}"))["status"] == 200
    assert call(gate, "/api/tags", ("X-Api-Key", KEY))["status"] == 200
    assert reached == [Caller(key="kitchen", address="192.0.2.10")] * 2


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ((), "no API key"),
        ((("Authorization", "Bearer not-the-key-at-all"),), "a wrong API key"),
        ((("Authorization", f"Basic {KEY}"),), "a wrong API key"),  # present but not a bearer token
        ((("Authorization", "Bearer "),), "a wrong API key"),
    ],
)
def test_no_or_a_wrong_key_is_401_in_the_routes_own_error_shape(headers: tuple, says: str) -> None:
    gate, reached = gate_for(keyed())
    openai = call(gate, "/v1/chat/completions", *headers)
    assert openai["status"] == 401 and openai["headers"]["www-authenticate"] == 'Bearer realm="edged"'
    assert openai["body"]["error"]["code"] == "unauthorized" and says in openai["body"]["error"]["message"]
    ollama = call(gate, "/api/chat", *headers)
    assert ollama["status"] == 401 and set(ollama["body"]) == {"error"} and says in ollama["body"]["error"]
    assert reached == [] and gate.refused_keys == 2


def test_health_is_open_and_local_routes_are_not_served() -> None:
    gate, reached = gate_for(keyed())
    assert call(gate, "/health")["status"] == 200
    for path in ("/metrics", "/v1/jobs"):
        answer = call(gate, path, ("Authorization", f"Bearer {KEY}"))
        assert answer["status"] == 404 and answer["body"]["error"]["code"] == "not_found"
    assert reached == [None], "only /health reached the app, without a caller"


def test_a_key_over_its_rate_gets_429_with_retry_after(clock: Clock) -> None:
    gate, reached = gate_for(keyed(rate_limit_per_min=2))
    auth = ("Authorization", f"Bearer {KEY}")
    assert [call(gate, "/v1/models", auth)["status"] for _ in range(2)] == [200, 200]
    over = call(gate, "/v1/models", auth, client="198.51.100.7")  # the key's bucket, from anywhere
    assert over["status"] == 429 and over["headers"]["retry-after"] == "30"
    assert over["body"]["error"]["code"] == "rate_limited" and "'kitchen'" in over["body"]["error"]["message"]
    clock.t += 30
    assert call(gate, "/v1/models", auth)["status"] == 200
    assert len(reached) == 3


def test_anonymous_clients_share_a_bucket_per_address(clock: Clock) -> None:
    gate, reached = gate_for(HttpConfig(listen="0.0.0.0:8080", allow_anonymous=True, rate_limit_per_min=1))
    assert call(gate, "/v1/models", client="2001:db8:1:2::1")["status"] == 200
    assert call(gate, "/v1/models", client="2001:db8:1:2::99")["status"] == 429, "the same /64"
    assert call(gate, "/v1/models", client="2001:db8:1:3::1")["status"] == 200
    assert [c.key if c else None for c in reached] == ["anonymous", "anonymous"]


def test_a_loopback_listener_without_keys_serves_anonymously_but_a_wrong_key_is_still_refused() -> None:
    gate, reached = gate_for(HttpConfig(listen="127.0.0.1:8080"))
    assert call(gate, "/v1/models", client="127.0.0.1")["status"] == 200
    assert call(gate, "/v1/models", ("Authorization", "Bearer guess"), client="127.0.0.1")["status"] == 401
    assert len(reached) == 1


def test_a_network_listener_needs_keys_or_allow_anonymous() -> None:
    with pytest.raises(ValueError, match="opens the API to the network"):
        HttpConfig(listen="0.0.0.0:8080")
    with pytest.raises(ValueError, match="shorter than 16 characters"):
        HttpConfig(listen="0.0.0.0:8080", api_keys={"short": SecretStr("abc")})

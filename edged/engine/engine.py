"""`Engine`: the facade transports talk to. Submission, cancel, deadlines and the job registry live
here, on the event loop; the scheduler's thread runs the backend; `snapshot` is the one read view."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from edged.backends import BackendChoice
from edged.backends.base import ModelFacts
from edged.engine.constraints import schema_cache_stats
from edged.engine.job import Job, JobRequest, JobResult, JobState, Prepared, new_job_id
from edged.engine.prepare import Preparer
from edged.engine.queue import JobQueue
from edged.engine.scheduler import Done, Emit, Fail, Outcome, Scheduler
from edged.engine.snapshot import EngineSnapshot, EngineState, SlotsInfo
from edged.engine.stats import EngineStats
from edged.errors import (
    BackendError,
    Cancelled,
    DeadlineExceeded,
    EdgedError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    NotReady,
    NotSupported,
    QueueFull,
    ShuttingDown,
)
from edged.telemetry.throughput import window_label

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import ContextOverflow, RouteFamily, Settings
    from edged.journal.book import JobBook
    from edged.journal.intake import JobIntake, Ticket

log = structlog.get_logger(__name__)

FINISHED_JOBS_KEPT = 1024


def owner_of(origin: str, peer: str | None) -> str:
    """Who a job's id belongs to when the transport does not say: the key's name on TCP
    (``tcp:<name>``), the peer's uid on the Unix socket (``socket:uid=<n>``), else the origin."""
    if origin == "socket" and peer:
        uid = next((part for part in peer.split() if part.startswith("uid=")), None)
        if uid is not None:
            return f"socket:{uid}"
    return origin


class Engine:
    """Queues jobs, hands them to the scheduler's slots, and settles them on the event loop."""

    def __init__(
        self, settings: Settings, board: BoardInfo, choice: BackendChoice, intake: JobIntake | None = None
    ) -> None:
        self.settings = settings
        self.intake = intake
        """The job journal (None with ``journal.enabled = false``)."""
        self.board = board
        self.state = EngineState.LOADING
        self.started_wall = time.time()
        self.stats = EngineStats(max(settings.telemetry.windows_s))
        self.queue = JobQueue(settings.queue.max_depth)
        self.preparer = Preparer(settings, board)
        self.scheduler = Scheduler(settings, board, choice, self.queue, self._deliver, self._backend_changed)
        self._jobs: OrderedDict[tuple[str, str], Job] = OrderedDict()
        """Jobs by (owner, id): a job id belongs to its requester, so two requesters' ids never meet."""
        self._room = asyncio.Event()
        self._room.set()
        self._backend_ready = asyncio.Event()  # cleared while a failed backend is being replaced
        self._backend_ready.set()
        self._backend_listeners: list[Callable[[], None]] = []
        self._loaded = asyncio.Event()  # set once loading ended, ready or failed
        self._settled = asyncio.Event()  # pulsed whenever results arrive (drain waits on it)

    @property
    def book(self) -> JobBook | None:
        """The journal's reads (``/v1/jobs``), None with ``journal.enabled = false``."""
        return self.intake.book if self.intake is not None else None

    def on_backend_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the loop) after a failed backend was replaced by the next one."""
        self._backend_listeners.append(listener)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (on the scheduler's thread, so the socket answers /health meanwhile)."""
        started = time.perf_counter()
        self.scheduler.start(asyncio.get_running_loop())
        try:
            caps = await asyncio.wrap_future(self.scheduler.loaded)
        except EdgedError:
            self.state = EngineState.FAILED
            self._loaded.set()
            raise
        log.info(
            "model ready",
            backend=self.scheduler.state.backend_name,
            model=self.scheduler.backend.model_name,
            slots=caps.max_sequences,
            load_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        self.state = EngineState.READY
        self._loaded.set()

    async def drain(self, timeout: float) -> int:
        """Refuse new work and start no queued job; wait up to ``timeout`` for the running ones to
        finish. Returns how many were still running (``stop`` ends them with ``ShuttingDown``)."""
        if self.state is EngineState.READY:
            self.state = EngineState.STOPPING
        self.scheduler.hold()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def running() -> int:  # started and not yet settled on the loop
            return sum(1 for job in self._jobs.values() if job.state is JobState.RUNNING and not job.finished)

        while running() and loop.time() < deadline:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), max(0.0, deadline - loop.time()))
        left = running()
        log.info("drained", unfinished=left, queued=len(self.queue), timeout_s=timeout)
        return left

    async def stop(self) -> None:
        """Refuse new work, end waiting and running jobs with ``ShuttingDown``, release the model."""
        self.state = EngineState.STOPPING
        self._loaded.set()
        for job in self.queue.drain():
            self._settle_failed(job, ShuttingDown("edged is shutting down"))
        for job in self.scheduler.running():
            job.stop_reason = job.stop_reason or ShuttingDown("edged is shutting down")
        if self.scheduler.alive:
            self.scheduler.stop()
            await asyncio.wait_for(asyncio.wrap_future(self.scheduler.finished), timeout=60)
            await asyncio.sleep(0)  # let the last results the scheduler posted settle their jobs

    def _backend_changed(self, ready: bool) -> None:
        if not ready:
            self._backend_ready.clear()
            return
        self._backend_ready.set()
        for listener in self._backend_listeners:
            try:
                listener()
            except Exception:
                log.exception("backend change listener failed")

    # -- submission -----------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name is None:
            return
        path = self.settings.model.path
        served = self.scheduler.backend.model_name
        if name not in {served, path.name if path else None}:
            raise ModelNotFound(
                f"model {name!r} is not loaded here; this edged serves {served!r}", param="model"
            )

    async def submit(
        self,
        request: JobRequest,
        origin: str = "",
        *,
        ticket: Ticket | None = None,
        peer: str | None = None,
        owner: str | None = None,
        family: RouteFamily | None = None,
    ) -> Job:
        """Validate, count the prompt against the cap and queue the job; raises `EdgedError`.
        ``origin`` says where it came from for the logs (``socket``, ``tcp:<key name>``, ``mqtt``).
        ``owner``: who the job's id belongs to (`owner_of` by default): another requester's job
        with the same id is a different job, and only its owner can read or cancel it on TCP/MQTT.

        ``ticket``: the transport journaled the job itself (MQTT: before its PUBACK); its start is
        counted in the journal before anything native touches it (``journal.max_attempts``).
        Without one, the job is journaled here (socket and TCP, with ``journal.socket``). What the
        journal does with it from then on is the intake's (`edged.journal.intake`). A job that
        arrives while the model loads waits for it within its own timeout.

        ``family``: the API the job came through (``openai``, ``ollama``, ``mqtt``), whose default
        ``context_overflow`` (``jobs.context_overflow``) applies when the job gives none.
        """
        owner = owner if owner is not None else owner_of(origin, peer)
        timeout = request.timeout_s or self.settings.jobs.timeout_s
        if timeout > self.settings.jobs.max_timeout_s:
            raise InvalidRequest(
                f"timeout_s {timeout} exceeds jobs.max_timeout_s ({self.settings.jobs.max_timeout_s})",
                param="timeout_s",
            )
        arrived = time.perf_counter()
        if self.state is EngineState.LOADING:
            try:
                await asyncio.wait_for(self._loaded.wait(), timeout)
            except TimeoutError:
                raise NotReady(
                    f"the model was still loading when the job's timeout ({timeout:g} s) passed"
                ) from None
        if self.state is not EngineState.READY:
            raise NotReady(f"edged is {self.state.value}, not ready for jobs")
        self._check_model(request.model)
        job_id = request.id or new_job_id()
        existing = self._jobs.get((owner, job_id))
        if existing is not None and not existing.finished:
            raise InvalidRequest(f"job {job_id!r} is already {existing.state.value}", param="id")
        self._refuse_when_full()
        await self._backend_ready.wait()  # a backend being replaced after a failure: wait for the next
        if ticket is not None and self.intake is not None:
            await self.intake.attempt(ticket)
        overflow = request.context_overflow or self.settings.jobs.context_overflow.of(family)
        prepared = self._check_constrained(await self._prepare(request, overflow))
        if self.state is not EngineState.READY:
            error = NotReady(f"edged is {self.state.value}, not ready for jobs")
            if ticket is not None and self.intake is not None:
                self.intake.not_started(ticket, job_id, error)
            raise error
        job = Job(job_id, request, prepared, arrived + timeout)
        job.origin = origin
        job.peer = peer
        job.owner = owner
        if ticket is None and self.intake is not None:
            ticket = await self.intake.accept_local(request, job_id, origin, owner)
        job.ticket = ticket
        try:
            self.queue.push(job)  # checks the room again: it may have filled while we tokenized
        except QueueFull as exc:
            self.stats.rejected()
            if ticket is not None and self.intake is not None:
                self.intake.not_started(ticket, job_id, exc)
            raise
        if ticket is not None and self.intake is not None:
            self.intake.running(ticket)
        remaining = max(0.0, job.deadline - time.perf_counter())
        job.timer = asyncio.get_running_loop().call_later(remaining, self._expire, job)
        self._remember(job)
        self._update_room()
        self.scheduler.wake()
        return job

    async def _prepare(self, request: JobRequest, overflow: ContextOverflow) -> Prepared:
        """The job's prompt and sampling (on a worker thread); anything but an `EdgedError` is
        turned into one, so a transport always has an error to answer with."""
        backend = self.scheduler.backend
        try:
            return await asyncio.to_thread(
                self.preparer.prepare, request, backend.tokenizer, backend.n_ctx, overflow
            )
        except EdgedError:
            raise
        except RecursionError:
            raise InvalidRequest("the job is nested too deeply to be read") from None
        except Exception as exc:
            log.exception("preparing a job failed", job_id=request.id)
            raise BackendError(f"edged could not prepare the job: {type(exc).__name__}") from exc

    def chat_template(self) -> str | None:
        """The loaded model's chat template (Jinja), if it has one."""
        if self.state is not EngineState.READY:
            return None
        template = self.scheduler.backend.tokenizer.template
        return template if isinstance(template, str) else None

    def structured_output(self) -> tuple[bool, str | None]:
        """Whether the loaded backend can constrain sampling (JSON schemas, GBNF, reasoning budgets),
        and why not."""
        caps = self.scheduler.state.capabilities
        if caps is not None and caps.constrained_output:
            return True, None
        name = self.scheduler.state.backend_name
        return False, (
            f"the {name} backend cannot constrain sampling (JSON schemas, grammars, reasoning "
            'budgets need llama.cpp: backend = "llamacpp")'
        )

    def tool_support(self) -> tuple[tuple[str, ...], str | None]:
        """The ``tool_choice`` modes the loaded backend and model can honour, and why not the others:
        all of them where sampling can be constrained; on a backend that cannot (the NPU), ``auto`` for
        a model with its own call format (its calls are parsed from the text and checked when the job
        ends), and nothing but ``none`` for the generic form, whose JSON envelope needs a grammar."""
        if self.structured_output()[0]:
            return ("none", "auto", "required", "named"), None
        name = self.scheduler.state.backend_name
        if self.preparer.family(self.scheduler.backend.tokenizer) == "generic":
            return ("none",), (
                f"the {name} backend cannot constrain output, and this model has no tool-call format of "
                "its own: edged's generic form (the answer one JSON object) needs a grammar"
            )
        return ("none", "auto"), (
            f"the {name} backend cannot constrain output to a tool call: tool_choice 'required' and a "
            "named tool are not_supported; with 'auto' the calls are parsed from the text"
        )

    def _check_constrained(self, prepared: Prepared) -> Prepared:
        """Refuses (`NotSupported`, before the job is queued) what the backend cannot constrain; a tool
        job's ``auto`` on a model with its own call format runs without its grammar there (the grammar
        only helps: the calls are parsed from the text and checked when the job ends)."""
        if prepared.constraint is None and prepared.params.reasoning_budget is None:
            return prepared
        able, reason = self.structured_output()
        if able:
            return prepared
        plan = prepared.tools
        if prepared.constraint is not None and prepared.constraint.kind == "tools" and plan is not None:
            name = self.scheduler.state.backend_name
            if plan.choice.mode in ("required", "named"):
                raise NotSupported(
                    f"tool_choice: the {name} backend cannot constrain output to a tool call (only "
                    "tool_choice 'auto' works there, with the calls parsed from the text)",
                    param="tool_choice",
                )
            if plan.family == "generic":
                raise NotSupported(
                    f"tools: this model has no tool-call format of its own, and edged's generic form "
                    f"needs a grammar, which the {name} backend cannot apply",
                    param="tools",
                )
            params = dataclasses.replace(prepared.params, grammar=None)
            prepared = dataclasses.replace(prepared, constraint=None, params=params)
            if params.reasoning_budget is None:
                return prepared
        option = "reasoning_budget" if prepared.constraint is None else prepared.constraint.param
        raise NotSupported(f"{option}: {reason}", param=option)

    def apply_thermal(self, paused: bool, derate_s: float) -> None:
        """Called by the thermal governor: paused admits nothing; derated decodes fewer sequences
        at once with a pause between steps."""
        self.scheduler.apply_thermal(paused, derate_s)
        self._update_room()

    def _refuse_when_full(self) -> None:
        if not self.queue.has_room():
            self.stats.rejected()
            raise QueueFull(f"the queue is full ({len(self.queue)} jobs waiting); retry later")

    def _update_room(self) -> None:
        if self.queue.has_room():
            self._room.set()
        else:
            self._room.clear()

    async def wait_for_room(self) -> None:
        """Return once a submitted job would be queued rather than refused with queue_full.

        Transports that can hold work back (MQTT, which has not acknowledged the message yet) wait
        here instead of answering queue_full.
        """
        while not self.queue.has_room():
            self._room.clear()
            await self._room.wait()

    @property
    def receive_maximum(self) -> int:
        """Jobs edged can hold at once (slots + queue): MQTT's Receive Maximum."""
        slots = self.scheduler.slots or self.settings.engine.slots(self.board)
        return slots + self.settings.queue.max_depth

    def recent(self, job_id: str, owner: str) -> Job | None:
        """``owner``'s job with this id, unless it finished more than ``jobs.keep_results_s`` ago,
        for duplicate deliveries."""
        job = self._jobs.get((owner, job_id))
        if job is None or job.finished_at is None:
            return job
        if time.monotonic() - job.finished_at > self.settings.jobs.keep_results_s:
            return None
        return job

    def _remember(self, job: Job) -> None:
        self._jobs[(job.owner, job.id)] = job
        self._jobs.move_to_end((job.owner, job.id))
        while len(self._jobs) > FINISHED_JOBS_KEPT:
            oldest = next(iter(self._jobs.values()))
            if not oldest.finished:
                break
            self._jobs.popitem(last=False)

    # -- cancel and deadlines -------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        """The jobs this process remembers (queued, running, and the last finished), oldest first."""
        return list(self._jobs.values())

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """``owner``'s job with this id; ``owner=None`` (the local socket, whose users may see every
        job) the newest job with it. Another requester's job is `NotFound`, as an unknown one."""
        if owner is not None:
            job = self._jobs.get((owner, job_id))
        else:
            job = next((j for j in reversed(self._jobs.values()) if j.id == job_id), None)
        if job is None:
            raise NotFound(f"no job {job_id!r} (unknown, or finished long ago)", param="id")
        return job

    def cancel(self, job_id: str, reason: str = "cancelled by the client", owner: str | None = None) -> Job:
        """Cancel a queued or running job (``owner`` as for `get`); a finished job is returned
        unchanged."""
        return self.cancel_job(self.get(job_id, owner), reason)

    def cancel_job(self, job: Job, reason: str = "cancelled by the client") -> Job:
        """Cancel this very job (a transport whose client went away)."""
        self._stop_job(job, Cancelled(reason))
        return job

    def _expire(self, job: Job) -> None:
        self._stop_job(job, DeadlineExceeded(f"job {job.id} passed its deadline while {job.state.value}"))

    def _stop_job(self, job: Job, error: EdgedError) -> None:
        if job.finished:
            return
        if self.queue.remove(job):
            self._update_room()
            self._settle_failed(job, error)
        elif job.stop_reason is None:
            job.stop_reason = error  # running: the scheduler frees its slot before the next step
            self.scheduler.wake()

    # -- results from the scheduler (on the loop) -----------------------------------------------

    def _deliver(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, Emit):
                if not outcome.job.finished:
                    outcome.job.push(outcome.delta)
            elif isinstance(outcome, Done):
                self._settle_done(outcome)
            elif isinstance(outcome, Fail):
                self._settle_failed(outcome.job, outcome.error)
        self._update_room()
        self._settled.set()

    def _settle_done(self, outcome: Done) -> None:
        job, result = outcome.job, outcome.result
        if not job.finish(JobState.DONE, result=result):
            return
        self._journal_ended(job, result, None)
        self.stats.done(result)
        fields: dict[str, Any] = (
            {
                "prompt": job.prompt.text,
                "content": result.content,
                "reasoning": result.reasoning_content or "",
            }
            if self.settings.log.content
            else {}
        )
        log.info(
            "job finished",
            job_id=job.id,
            origin=job.origin,
            peer=job.peer,
            state="done",
            finish_reason=result.finish_reason,
            clamped=job.prepared.clamped,
            **result.usage.model_dump(),
            **result.timings.model_dump(),
            **fields,
        )

    def _settle_failed(self, job: Job, error: EdgedError) -> None:
        state = JobState.CANCELLED if isinstance(error, Cancelled) else JobState.FAILED
        if not job.finish(state, error=error):
            return
        self._journal_ended(job, None, error)
        self.stats.failed(job, state)
        log.info(
            "job finished",
            job_id=job.id,
            origin=job.origin,
            peer=job.peer,
            state=state.value,
            code=error.code,
            error=error.message,
            completion_tokens=job.completion_tokens,
            total_ms=round((time.perf_counter() - job.submitted) * 1000, 1),
        )

    def _journal_ended(self, job: Job, result: JobResult | None, error: EdgedError | None) -> None:
        if job.ticket is not None and self.intake is not None:
            self.intake.ended(job.ticket, job.id, result, error)

    # -- reading --------------------------------------------------------------------------------

    def healthy(self, stall_s: float) -> bool:
        """Ready, and running jobs produced a token within ``stall_s`` (the watchdog's question)."""
        if self.state is not EngineState.READY or not self.scheduler.alive:
            return False
        return not self.scheduler.stalled(stall_s)

    def snapshot(self) -> EngineSnapshot:
        sched = self.scheduler
        backend = sched.backend
        thermal = sched.thermal
        cache = backend.cache_stats() if self.state is EngineState.READY else None
        return EngineSnapshot(
            state=self.state,
            backend=sched.state.backend_name,
            model=backend.model_name,
            n_ctx=backend.n_ctx,
            fallback_reasons=list(sched.state.fallback_reasons),
            load_error=sched.state.load_error,
            backend_details=backend.describe() if self.state is EngineState.READY else {},
            slots=SlotsInfo(total=sched.slots, effective=sched.effective_slots, active=len(sched.running())),
            queue_depth=len(self.queue),
            queue_max_depth=self.settings.queue.max_depth,
            running=[job.info() for job in sched.running()],
            counters=dict(self.stats.counters),
            totals=dict(self.stats.totals),
            thermal={"paused": thermal.paused, "derate_pause_ms": round(thermal.derate_s * 1000, 1)},
            last_job=self.stats.last_job,
            throughput={
                window_label(w): self.stats.throughput.summary(w) for w in self.settings.telemetry.windows_s
            },
            prefix_cache=cache,
            started_wall=self.started_wall,
            structured_output=self._structured_output_status(),
            profile=self.board.profile.name,
            histograms=tuple(h.reading() for h in self.stats.histograms.values()),
            model_facts=caps.model
            if (caps := sched.state.capabilities) and self.state is EngineState.READY
            else ModelFacts(format=backend.file_format),
        )

    def _structured_output_status(self) -> dict[str, Any]:
        able, reason = self.structured_output()
        status: dict[str, Any] = {"available": able, "reason": reason, "schema_cache": schema_cache_stats()}
        if self.state is EngineState.READY and self._backend_ready.is_set():  # not while one is replaced
            choices, why = self.tool_support()
            status["tools"] = {"tool_choice": list(choices), "reason": why}
        return status

"""The slots loop: one thread that owns the backend, fills free slots from the queue and steps.

Like llama.cpp server's ``update_slots``: between steps, stopped jobs leave their slots and waiting
jobs take free ones (arrival order); each step advances every active sequence by one forward pass.
Text handling (incremental UTF-8, stop strings, ``<think>`` split: `edged.engine.text`) and token
counting happen here, right where tokens come out, so a stop string ends its sequence in the same
step that completed it.
Results go to the event loop in one ``call_soon_threadsafe`` per step.

Load, steps and close all run on this one thread: llama.cpp keeps per-thread state (its OpenMP
team), and decode speed halved when calls hopped between executor threads. Loading the backend and
replacing a failed one by the next of the profile is `edged.engine.backend_host`'s part.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import structlog

from edged.backends import Backend, BackendChoice, Capabilities, SeqOutput
from edged.engine.backend_host import BackendHost, BackendState
from edged.engine.constraints import check_answer
from edged.engine.job import CallPiece, Delta, Job, JobResult, JobState, Usage
from edged.engine.queue import JobQueue
from edged.engine.text import SeqText
from edged.engine.timings import Clock, compute_timings
from edged.errors import (
    BackendError,
    DeadlineExceeded,
    EdgedError,
    InvalidOutput,
    ShuttingDown,
)
from edged.tools.grammar import check_call
from edged.tools.parse import StreamDelta, StreamParser
from edged.tools.spec import call_ids_for

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

log = structlog.get_logger(__name__)

IDLE_WAIT_S = 1.0
BLOCKED_WAIT_S = 0.05
"""How long to wait before retrying admission that the backend refused (KV cells short)."""


@dataclass(frozen=True)
class Emit:
    job: Job
    delta: Delta | CallPiece


@dataclass(frozen=True)
class Done:
    job: Job
    result: JobResult


@dataclass(frozen=True)
class Fail:
    job: Job
    error: EdgedError


Outcome = Emit | Done | Fail


@dataclass
class Running:
    """A job in a slot."""

    job: Job
    slot: int
    text: SeqText
    clock: Clock
    cache_n: int = 0
    perf: dict[str, float] | None = None
    calls: StreamParser | None = None
    """A tool job's answer, parsed as it comes: the text beside the calls goes out as content, the
    calls as `CallPiece` events (validated only when the answer is complete)."""


@dataclass
class Thermal:
    paused: bool = False
    derate_s: float = 0.0


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        board: BoardInfo,
        choice: BackendChoice,
        queue: JobQueue,
        deliver: Callable[[list[Outcome]], None],
        on_backend: Callable[[bool], None],
    ) -> None:
        self.queue = queue
        self._deliver = deliver
        self._on_backend = on_backend
        """Told False while a failed backend is being replaced, True once the next one is loaded."""
        self.host = BackendHost(settings, board, choice, self._post_backend)
        """The backend, its loading and its replacement by a fallback (all on this one thread)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thermal = Thermal()
        self._holding = False
        self._active: dict[int, Running] = {}
        self._thread: threading.Thread | None = None
        self.loaded: concurrent.futures.Future[Capabilities] = concurrent.futures.Future()
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.last_progress = time.monotonic()
        self.steps = 0
        self.idle_checks = 0
        self.busy_since: float | None = None
        """When the current backend call (step, admit, release) began; None between calls."""

    # -- control (any thread) -----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._main, name="edged-backend", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.backend.interrupt()

    def hold(self) -> None:
        """Start no more jobs (shutting down: the running ones may finish, queued ones wait)."""
        with self._cond:
            self._holding = True
            self._cond.notify()

    def apply_thermal(self, paused: bool, derate_s: float) -> None:
        with self._cond:
            self._thermal = Thermal(paused=paused, derate_s=derate_s)
            self._cond.notify()

    @property
    def thermal(self) -> Thermal:
        return self._thermal

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def slots(self) -> int:
        caps = self.state.capabilities
        return caps.max_sequences if caps else 0

    @property
    def effective_slots(self) -> int:
        """Slots in use now: all of them, half while the board is derated (fewer sequences decode at
        once instead of all of them stalling), none while paused."""
        if self._thermal.paused:
            return 0
        if self._thermal.derate_s > 0:
            return max(1, self.slots // 2)
        return self.slots

    def stalled(self, stall_s: float) -> bool:
        """Work is under way (jobs in slots, or a backend call) but no token came for ``stall_s``.

        A call that frees a hung sequence does not reset the clock: a runtime that ignores its abort
        keeps the engine unhealthy until it returns."""
        working = self.busy_since is not None or bool(self._active)
        return working and time.monotonic() - self.last_progress > stall_s

    def running(self) -> list[Job]:
        return [run.job for run in list(self._active.values())]

    @property
    def backend(self) -> Backend:
        return self.host.backend

    @property
    def state(self) -> BackendState:
        return self.host.state

    # -- the thread ---------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            caps = self.host.load_first()
        except BaseException as exc:
            self.loaded.set_exception(exc)
            self.finished.set_result(None)
            return
        self.loaded.set_result(caps)
        try:
            self._run()
        except BaseException as exc:  # a bug here must not leave jobs hanging forever
            log.exception("the scheduler crashed")
            self._fail_all(BackendError(f"the engine's scheduler failed: {exc}"))
        finally:
            self.host.close()
            self.finished.set_result(None)

    def _post_backend(self, ready: bool) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_backend, ready)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._active and not self._could_admit():
                    self.idle_checks += 1  # found nothing it may start (tests synchronise on this)
                    self._update_room()
                    self._cond.wait(IDLE_WAIT_S)
                if self._stopping:
                    break
            outcomes: list[Outcome] = []
            self._reap(outcomes)
            self._admit()
            if not self._active:
                self._send(outcomes)
                with self._cond:
                    if not self._stopping:
                        self._cond.wait(BLOCKED_WAIT_S)
                continue
            try:
                self.busy_since = time.monotonic()
                outputs = self.backend.step()
            except Exception as exc:
                if self._stopping:
                    break
                if isinstance(exc, BackendError):
                    failure = BackendError(f"{self.state.backend_name}: {exc.message}")
                else:  # a backend bug must fail the jobs, never the daemon
                    log.exception("backend crashed")
                    failure = BackendError(f"the backend failed: {exc}")
                for run in list(self._active.values()):
                    self._release(run)
                    outcomes.append(Fail(run.job, failure))
                self._send(outcomes)
                self.host.replace_after_failure(failure)
                continue
            finally:
                self.busy_since = None
            self.steps += 1
            if outputs:
                self.last_progress = time.monotonic()
            self._handle(outputs, outcomes)
            self._send(outcomes)
            derate = self._thermal.derate_s
            if derate:
                time.sleep(derate)  # derated: a pause between steps cools the cores
        self._fail_all(ShuttingDown("edged is shutting down"))

    def _could_admit(self) -> bool:
        return not self._holding and len(self.queue) > 0 and len(self._active) < self.effective_slots

    def _update_room(self) -> None:
        self.queue.free_slots = max(0, self.effective_slots - len(self._active))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, [])

    def _admit(self) -> None:
        """Fill free slots with waiting jobs, oldest first; stop at the first the backend cannot take
        yet (KV cells short), so later jobs never overtake it."""
        while not self._holding and len(self._active) < self.effective_slots:
            job = self.queue.peek()
            if job is None:
                break
            slot = next(s for s in range(self.slots) if s not in self._active)
            try:
                admitted = self.backend.admit(slot, job.prepared.prompt, job.prepared.params)
            except Exception as exc:  # a backend bug or a job it cannot start fails that job, not the engine
                log.exception("admitting a job failed", job_id=job.id)
                with contextlib.suppress(Exception):
                    self.backend.release(slot)
                if self.queue.take(job):
                    reason = exc.message if isinstance(exc, EdgedError) else f"{type(exc).__name__}: {exc}"
                    self._send([Fail(job, BackendError(f"the backend could not start the job: {reason}"))])
                continue
            if not admitted:
                break
            if not self.queue.take(job):  # cancelled or expired while being admitted
                self.backend.release(slot)
                continue
            job.state = JobState.RUNNING
            clock = Clock(submitted=job.submitted, started=time.perf_counter())
            text = SeqText(job.request.stops, job.prepared.in_think)
            if not self._active:
                self.last_progress = time.monotonic()  # the stall clock starts with the work
            plan = job.prepared.tools
            calls = StreamParser(plan.family, call_ids_for(job.id)) if plan is not None else None
            self._active[slot] = Running(job=job, slot=slot, text=text, clock=clock, calls=calls)
        self._update_room()

    def _reap(self, outcomes: list[Outcome]) -> None:
        """Jobs stopped from outside (cancel, deadline) leave their slots now."""
        for run in list(self._active.values()):
            reason = run.job.stop_reason
            if reason is not None:
                self._release(run)
                constraint = run.job.prepared.constraint
                engaged = constraint is not None and (  # a lazy grammar counts once a call began
                    constraint.grammar.trigger is None or (run.calls is not None and run.calls.calling)
                )
                if isinstance(reason, DeadlineExceeded) and engaged:
                    reason = InvalidOutput(
                        f"{reason.message}, before the constrained answer was complete",
                        content="".join(run.text.parts["content"]),
                        finish_reason="length",
                    )
                outcomes.append(Fail(run.job, reason))

    def _release(self, run: Running) -> None:
        self._active.pop(run.slot, None)
        self.busy_since = time.monotonic()
        try:
            perf = self.backend.release(run.slot)
        except Exception:
            log.exception("releasing a sequence failed", job_id=run.job.id)
            return
        finally:
            self.busy_since = None
        if perf is not None:
            run.perf = perf

    def _handle(self, outputs: list[SeqOutput], outcomes: list[Outcome]) -> None:
        now = time.perf_counter()
        decoded = sum(1 for out in outputs if not out.end)
        for out in outputs:
            run = self._active.get(out.slot)
            if run is None:
                continue
            if out.cache_n is not None:
                run.cache_n = out.cache_n
            if out.perf is not None:
                run.perf = out.perf
            if out.error is not None:
                self._release(run)
                if out.job_fault:
                    content = "".join(run.text.parts["content"])
                    outcomes.append(Fail(run.job, InvalidOutput(out.error, content=content)))
                else:
                    outcomes.append(Fail(run.job, BackendError(out.error)))
                continue
            if out.end:
                self._finish(run, "stop", now, outcomes)
                continue
            job = run.job
            if run.clock.first is None:
                run.clock.first = now
            else:
                run.clock.batch_sum += decoded
                run.clock.batch_steps += 1
            job.completion_tokens += 1
            for kind, text in run.text.feed(out.piece):
                self._emit(run, kind, text, outcomes)
            if run.text.stopped:
                self._finish(run, "stop", now, outcomes)
            elif job.completion_tokens >= job.prepared.params.max_tokens:
                self._finish(run, "length", now, outcomes)

    @staticmethod
    def _emit(run: Running, kind: str, text: str, outcomes: list[Outcome]) -> None:
        """A piece of reasoning or content as a delta; a tool job's content goes through its parser
        first, so no call markup is ever streamed: its calls go out as `CallPiece` events, as they
        are written (the result carries them whole, validated)."""
        if kind == "content" and run.calls is not None:
            Scheduler._emit_parsed(run.job, run.calls.feed(text), outcomes)
            return
        outcomes.append(Emit(run.job, Delta(kind, text)))  # type: ignore[arg-type]

    @staticmethod
    def _emit_parsed(job: Job, pieces: list[StreamDelta], outcomes: list[Outcome]) -> None:
        for piece in pieces:
            if piece.content:
                outcomes.append(Emit(job, Delta("content", piece.content)))
            if piece.call is not None:
                outcomes.append(Emit(job, CallPiece(piece.call)))

    def _finish(
        self, run: Running, reason: Literal["stop", "length"], now: float, outcomes: list[Outcome]
    ) -> None:
        self._release(run)
        job = run.job
        for kind, text in run.text.flush():
            self._emit(run, kind, text, outcomes)
        run.clock.ended = now
        n_prompt = len(job.prompt.tokens)
        timings = compute_timings(
            run.clock,
            prompt_tokens=n_prompt,
            cache_n=run.cache_n,
            predicted_n=job.completion_tokens,
            perf=run.perf,
            trimmed_messages=job.prepared.trimmed_messages,
        )
        reasoning = "".join(run.text.parts["reasoning"])
        result = JobResult(
            id=job.id,
            model=self.backend.model_name,
            created=job.created,
            content="".join(run.text.parts["content"]),
            reasoning_content=reasoning if reasoning or job.prepared.in_think else None,
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=n_prompt,
                completion_tokens=job.completion_tokens,
                total_tokens=n_prompt + job.completion_tokens,
            ),
            timings=timings,
        )
        result.notes = self.backend.job_notes(job.prepared.params) or None
        constraint = job.prepared.constraint
        plan = job.prepared.tools
        if reason == "length" and run.calls is not None and plan is not None:
            pieces, began_a_call = run.calls.cut()
            if not began_a_call and plan.choice.mode == "auto":  # a text answer cut short: what it said
                self._emit_parsed(job, pieces, outcomes)
                result.content = run.calls.content
                outcomes.append(Done(job, result))
                return
            if began_a_call and self._keep_complete_calls(run, result):
                outcomes.append(Done(job, result))
                return
        if constraint is not None or run.calls is not None:
            try:
                if reason == "length" and constraint is not None:
                    what = {"tools": "tool call", "grammar": "grammar"}.get(constraint.kind, "JSON")
                    raise InvalidOutput(
                        f"the answer was cut at max_tokens ({job.prepared.params.max_tokens}) before "
                        f"the {what} was complete; raise max_tokens (or lower reasoning_budget)",
                        content=result.content,
                    )
                if run.calls is not None:
                    self._read_calls(run, result, outcomes)
                elif constraint is not None:
                    result.parsed = check_answer(constraint, result.content)
            except InvalidOutput as exc:
                exc.details.update(
                    finish_reason=reason,
                    reasoning_content=result.reasoning_content,
                    usage=result.usage.model_dump(),
                )
                outcomes.append(Fail(job, exc))
                return
        outcomes.append(Done(job, result))

    @staticmethod
    def _keep_complete_calls(run: Running, result: JobResult) -> bool:
        """An answer cut by ``max_tokens`` while writing a call, after one or more complete ones: those
        (each valid against its tool's schema) are the answer, with ``finish_reason: "length"`` and a
        note; the call being written is dropped. False (the answer is `invalid_output`) when no call
        was complete or one is not valid."""
        plan = run.job.prepared.tools
        assert run.calls is not None and plan is not None
        kept = run.calls.complete_calls()
        if not kept.tool_calls or kept.malformed:
            return False
        try:
            for call in kept.tool_calls:
                check_call(call, plan.tools, plan.choice)
        except InvalidOutput:
            return False
        result.content = kept.content
        result.tool_calls = [call.to_openai() for call in kept.tool_calls]
        note = (
            f"cut at max_tokens ({run.job.prepared.params.max_tokens}) while writing a tool call: the "
            f"{len(kept.tool_calls)} complete call(s) before it are kept, the one being written is dropped"
        )
        result.notes = [*(result.notes or []), note]
        return True

    def _read_calls(self, run: Running, result: JobResult, outcomes: list[Outcome]) -> None:
        """A tool job's answer split into its content and its calls, each call validated against its
        tool's schema; raises `InvalidOutput` for a call that is not well formed or not valid, or
        none where the choice forces one."""
        plan = run.job.prepared.tools
        assert run.calls is not None and plan is not None
        raw = result.content
        pieces, parsed = run.calls.finish()
        self._emit_parsed(run.job, pieces, outcomes)  # a call that fails below ends its stream failed
        if parsed.malformed:
            raise InvalidOutput(
                f"the model wrote a tool call that is not well formed: {parsed.malformed[0][:200]!r}",
                content=raw,
            )
        for call in parsed.tool_calls:
            check_call(call, plan.tools, plan.choice)
        if not parsed.tool_calls and plan.choice.mode in ("required", "named"):
            raise InvalidOutput(
                f"the model made no tool call, which tool_choice {plan.choice.mode!r} requires",
                content=raw,
            )
        result.content = parsed.content
        if parsed.tool_calls:
            result.tool_calls = [call.to_openai() for call in parsed.tool_calls]
            if result.finish_reason == "stop":
                result.finish_reason = "tool_calls"

    def _fail_all(self, error: EdgedError) -> None:
        outcomes: list[Outcome] = []
        for run in list(self._active.values()):
            self._release(run)
            outcomes.append(Fail(run.job, run.job.stop_reason or error))
        self._send(outcomes)

    def _send(self, outcomes: list[Outcome]) -> None:
        if outcomes and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, outcomes)

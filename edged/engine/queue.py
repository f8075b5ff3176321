"""The bounded FIFO of jobs waiting for a slot: admission, back-pressure and removal.

Shared by two threads: the event loop pushes and removes (cancel, deadline), the scheduler's thread
takes the oldest job when a slot frees up. One lock covers both, so a job is either still waiting
(and a cancel removes it) or taken (and a cancel reaches it through ``Job.stop_reason``), never both.
"""

from __future__ import annotations

import threading
from collections import deque

from edged.engine.job import Job
from edged.errors import QueueFull


class JobQueue:
    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._jobs: deque[Job] = deque()
        self._lock = threading.Lock()
        self.free_slots = 0
        """Slots the scheduler could fill right now (set by the scheduler); they add to the room."""

    def __len__(self) -> int:
        return len(self._jobs)

    def has_room(self) -> bool:
        """A new job would wait (or start) rather than be refused: waiting < max_depth + free slots."""
        return len(self._jobs) < self.max_depth + self.free_slots

    def push(self, job: Job) -> None:
        with self._lock:
            if not self.has_room():
                raise QueueFull(f"the queue is full ({len(self._jobs)} jobs waiting); retry later")
            self._jobs.append(job)

    def remove(self, job: Job) -> bool:
        """Take a waiting job out (cancelled, expired); False if the scheduler already took it."""
        with self._lock:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def peek(self) -> Job | None:
        with self._lock:
            return self._jobs[0] if self._jobs else None

    def take(self, job: Job) -> bool:
        """The scheduler takes ``job`` (the head it peeked) unless it was removed meanwhile."""
        with self._lock:
            if self._jobs and self._jobs[0] is job:
                self._jobs.popleft()
                return True
            return False

    def drain(self) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs

    def waiting(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

"""`JobQueue`: first come first served, bounded by ``max_depth`` plus the free slots, and a waiting
job either removed (cancel, deadline) or taken by the scheduler, never both."""

from __future__ import annotations

import pytest

from edged.backends import Prompt, SamplingParams
from edged.engine.job import Job, JobRequest, Prepared
from edged.engine.queue import JobQueue
from edged.errors import QueueFull, Unavailable

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)


def job(name: str) -> Job:
    prepared = Prepared(prompt=Prompt(text=name, tokens=[1, 2]), params=PARAMS, clamped=False, in_think=False)
    return Job(name, JobRequest(prompt=name), prepared, deadline=1e12)


def test_jobs_leave_in_the_order_they_came() -> None:
    queue = JobQueue(max_depth=8)
    jobs = [job(n) for n in "abcd"]
    for j in jobs:
        queue.push(j)
    taken = []
    while (head := queue.peek()) is not None:
        assert queue.take(head)
        taken.append(head)
    assert taken == jobs and len(queue) == 0


def test_a_full_queue_refuses_with_queue_full() -> None:
    queue = JobQueue(max_depth=2)
    queue.push(job("a"))
    queue.push(job("b"))
    assert not queue.has_room()
    with pytest.raises(QueueFull) as info:
        queue.push(job("c"))
    assert "2 jobs waiting" in info.value.message
    assert isinstance(info.value, Unavailable) and info.value.http_status == 503  # a client may retry
    assert [j.id for j in queue.waiting()] == ["a", "b"], "the refused job is not in the queue"


def test_free_slots_count_as_room() -> None:
    """A job that can start at once is not refused because the waiting line is full."""
    queue = JobQueue(max_depth=1)
    queue.free_slots = 2
    for name in "abc":
        queue.push(job(name))
    with pytest.raises(QueueFull):
        queue.push(job("d"))
    queue.free_slots = 0
    assert not queue.has_room()


def test_a_removed_job_cannot_be_taken_and_a_taken_one_cannot_be_removed() -> None:
    queue = JobQueue(max_depth=4)
    a, b, c = job("a"), job("b"), job("c")
    for j in (a, b, c):
        queue.push(j)
    assert queue.remove(b)  # cancelled while waiting
    assert not queue.remove(b), "removed once"
    head = queue.peek()
    assert head is a and queue.take(a)
    assert not queue.remove(a), "the scheduler has it: a cancel must reach it through the job instead"
    assert queue.peek() is c


def test_take_is_only_for_the_head_the_scheduler_peeked() -> None:
    queue = JobQueue(max_depth=4)
    a, b = job("a"), job("b")
    queue.push(a)
    queue.push(b)
    peeked = queue.peek()
    assert queue.remove(a)  # a cancel between peek and take
    assert peeked is a and not queue.take(a), "gone meanwhile: not taken"
    assert not queue.take(job("elsewhere"))
    assert queue.take(b) and len(queue) == 0
    assert queue.peek() is None and not queue.take(b)


def test_drain_empties_the_queue_and_hands_back_every_waiting_job() -> None:
    queue = JobQueue(max_depth=4)
    jobs = [job(n) for n in "xyz"]
    for j in jobs:
        queue.push(j)
    assert queue.drain() == jobs
    assert len(queue) == 0 and queue.waiting() == [] and queue.drain() == []
    queue.push(job("after"))  # room again
    assert len(queue) == 1

"""Admission by time: how long a request queued now would wait for a batch slot, and the refusal that bounds it.

The estimate is a count of steps times a time per step:

- ``AdmissionReplay``: FIFO admission replayed over the running requests' remaining steps and the queued requests'
  step counts, in steps from now;
- ``BusyStepTime``: the seconds of a step of a busy batch, as a mean and a mean deviation of the steps measured;
- ``Admission``: one engine's estimator: the replay of its batch and queue (built once per step, extended by each
  request queued), the wait in seconds, and the check ``Engine.submit`` refuses a request with.

Plain Python, no tensors: the scheduler and the engine both read it.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .types import QueueFullError

# Retry-After for a full queue: about one request's share of a drained queue, short enough to retry soon.
QUEUE_FULL_RETRY_AFTER_S = 1.0
# Weight of the newest busy step in the step-time average the wait estimate converts steps with.
STEP_TIME_SMOOTHING = 0.1
# Mean deviations of the step time added to its mean when a wait is estimated.
STEP_TIME_DEVIATIONS = 2.0
# How often (seconds) the engine refreshes the wait estimate it reports to observers.
WAIT_ESTIMATE_PERIOD_S = 0.25


@dataclass
class AdmissionReplay:
    """The batch's rows as FIFO admission will hand them out, in steps from now: the running requests give theirs
    back when their remaining steps are done, and each queued request takes its rows at the first step they are free
    and holds them for its step count. Extended one request at a time, so a new request's wait costs a few heap
    operations, not a replay of the whole queue (0.47 ms in Python behind 270 queued requests)."""

    max_rows: int
    free: int  # rows free at step ``now``, once the requests replayed so far are in
    done_at: list[tuple[int, int]]  # a heap of (step, rows it gives back)
    now: int = 0  # the step the last request replayed is admitted at

    @classmethod
    def of(cls, max_rows: int, running: Iterable[tuple[int, int]],
           waiting: Iterable[tuple[int, int]]) -> "AdmissionReplay":
        """The replay of ``running`` (rows, steps left) and then ``waiting`` (rows, steps), in queue order."""
        done_at = [(steps, rows) for rows, steps in running]
        heapq.heapify(done_at)
        replay = cls(max_rows=max_rows, free=max_rows - sum(rows for _, rows in done_at), done_at=done_at)
        for rows, steps in waiting:
            replay.admit(rows, steps)
        return replay

    def admit(self, rows: int, steps: int) -> int:
        """Replay a request of ``rows`` rows and ``steps`` steps queued behind the rest; the step it is admitted at."""
        while self.free < rows and self.done_at:
            step, freed = heapq.heappop(self.done_at)
            self.now, self.free = max(self.now, step), self.free + freed
        self.free -= rows
        heapq.heappush(self.done_at, (self.now + steps, rows))
        return self.now

    def wait(self, rows: int) -> int:
        """The step a request of ``rows`` rows queued now would be admitted at; this replay stays as it was (what
        the answer pops is pushed back: a few heap operations, not a copy of a heap as long as the queue)."""
        free, now, popped = self.free, self.now, []
        while free < rows and self.done_at:
            step, freed = heapq.heappop(self.done_at)
            popped.append((step, freed))
            now, free = max(now, step), free + freed
        for entry in popped:
            heapq.heappush(self.done_at, entry)
        return now


class BusyStepTime:
    """Seconds of a step of a busy batch (at least half its rows in use): what turns a wait in steps into one in
    seconds. Starts from the warm-up's measurement (or the first busy step), then follows the busy steps that run as
    a mean and a mean deviation, as TCP times its round trips (Jacobson 1988)."""

    def __init__(self, max_rows: int, seconds: float | None):
        self.max_rows = max_rows
        self.mean = seconds
        self.deviation = 0.0
        self._last_busy = False
        self._last_end: float | None = None

    def observe(self, rows: int, start: float, end: float) -> None:
        """A step of ``rows`` real rows ran from ``start`` to ``end`` (time.monotonic())."""
        busy = 2 * rows >= self.max_rows  # what a queued request waits behind
        if busy:
            # Step to step when the last one was busy too: the loop's own work between steps (delivering results,
            # admitting) and what else holds this process's GIL (the replica's HTTP work) are part of a wait.
            seconds = end - (self._last_end if self._last_busy and self._last_end is not None else start)
            if self.mean is None:
                self.mean = seconds
            else:
                self.deviation += STEP_TIME_SMOOTHING * (abs(seconds - self.mean) - self.deviation)
                self.mean += STEP_TIME_SMOOTHING * (seconds - self.mean)
        self._last_busy = busy
        self._last_end = end

    def wait_seconds(self, steps: int) -> float:
        """``steps`` of waiting in seconds (0 before any step time is known)."""
        if self.mean is None or not steps:
            return 0.0
        # Admitted at the schedule after the step that frees its rows: one step more than the replay counts. Each
        # step at its mean time plus two mean deviations, so that a burst of slow steps (a busy host) does not
        # carry the requests admitted just under the bound past it.
        step = self.mean + STEP_TIME_DEVIATIONS * self.deviation
        return (steps + 1) * step


class Admission:
    """One engine's admission by time: the estimated wait of a request queued now, and the check that refuses one.

    ``replay`` replays the engine's batch and queue as they stand (``AdmissionReplay``); it is called at most once
    per engine step, and each request queued until the next extends that replay (``queued``), so an estimate does
    not replay the whole queue. ``lock`` is the engine's: it keeps the replay and the queue in step."""

    def __init__(self, replay: Callable[[], AdmissionReplay], lock: threading.Lock, step_time: BusyStepTime,
                 max_queue_size: int, max_queue_wait_s: float | None):
        self._replay_now = replay
        self._lock = lock
        self.step_time = step_time
        self.max_queue_size = max_queue_size
        self.max_queue_wait_s = max_queue_wait_s
        self._replay: AdmissionReplay | None = None  # of the batch and queue until the next step
        self._reported = (0.0, 0.0)  # (time.monotonic() when estimated, seconds)

    # ---- called under the lock ----------------------------------------------------------------------------------
    def replay(self) -> AdmissionReplay:
        """The admission replay of the batch and the queue as they stand."""
        if self._replay is None:
            self._replay = self._replay_now()
        return self._replay

    def check(self, rows: int, images: int, waiting_images: int, deadline: float | None) -> None:
        """Raise QueueFullError when a request of ``rows`` rows and ``images`` images would wait for a batch slot
        past ``max_queue_wait_s`` or past its ``deadline``, or would overfill the queue's memory guard (its
        ``waiting_images`` images waiting)."""
        if waiting_images + images > self.max_queue_size:
            raise QueueFullError(f"the queue is full ({waiting_images} images waiting, limit {self.max_queue_size}); "
                                 "retry later", retry_after=QUEUE_FULL_RETRY_AFTER_S)
        wait = self.step_time.wait_seconds(self.replay().wait(rows))
        bound = self.max_queue_wait_s
        if bound is not None and wait > bound:
            raise QueueFullError(f"busy: a request now would wait about {wait:.1f} s for a batch slot, past this "
                                 f"model's max_queue_wait_s of {bound:g} s; retry after the Retry-After delay",
                                 retry_after=wait - bound)
        if deadline is not None and time.time() + wait > deadline:
            raise QueueFullError(f"busy: a request now would wait about {wait:.1f} s for a batch slot, past its "
                                 "deadline; retry after the Retry-After delay", retry_after=wait)

    def queued(self, rows: int, steps: int) -> None:
        """A request of ``rows`` rows and ``steps`` steps joined the back of the queue."""
        if self._replay is not None:
            self._replay.admit(rows, steps)

    def stepped(self) -> None:
        """Requests were admitted, advanced, finished or dropped: replayed afresh when next asked."""
        self._replay = None

    # ---- called from any thread ---------------------------------------------------------------------------------
    def estimated_wait(self, rows: int) -> float:
        """Seconds a request of ``rows`` rows queued now would wait for admission: the FIFO admission of the requests
        ahead replayed step by step, times the busy step time (a high estimate of it: the mean plus two mean
        deviations)."""
        with self._lock:
            steps = self.replay().wait(rows)
        return self.step_time.wait_seconds(steps)

    def reported_wait(self, now: float, rows: int) -> float:
        """``estimated_wait(rows)`` refreshed at most every ``WAIT_ESTIMATE_PERIOD_S``: what each step reports."""
        estimated_at, wait = self._reported
        if now - estimated_at >= WAIT_ESTIMATE_PERIOD_S:
            wait = self.estimated_wait(rows)
            self._reported = (now, wait)
        return wait

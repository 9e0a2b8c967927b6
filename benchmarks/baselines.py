"""The batching policies the load benchmark compares step-level batching with, as schedulers of their own.

- ``request``: request-level batching: a batch runs to completion before the next one forms from the queue;
- ``single``: one request at a time.

Both admit only into an emptied batch, so their admission replay (the engine's wait estimate) empties the batch
before it admits. ``use_policy`` gives an idle engine one of them (or the production scheduler back, ``step``).
"""

from __future__ import annotations

from collections import deque

from dit_runtime.engine.admission import AdmissionReplay
from dit_runtime.engine.scheduler import RequestState, Scheduler


class EmptiedBatchReplay(AdmissionReplay):
    """FIFO admission into an emptied batch: a request waits for every request ahead of it to finish."""

    def admit(self, rows: int, steps: int) -> int:
        if self.done_at:
            self.now = max(self.now, max(step for step, _ in self.done_at))
            self.free, self.done_at = self.max_rows, []
        return super().admit(rows, steps)

    def wait(self, rows: int) -> int:
        return max([self.now] + [step for step, _ in self.done_at])


class RequestLevelScheduler(Scheduler):
    """Request-level batching: what the queue's head and those behind it that fit, once the batch is empty."""

    replay_type = EmptiedBatchReplay

    def _admit(self, now: float) -> list[RequestState]:
        return [] if self.running else super()._admit(now)


class SingleRequestScheduler(Scheduler):
    """One request at a time."""

    replay_type = EmptiedBatchReplay

    def _admit(self, now: float) -> list[RequestState]:
        if self.running or not self.waiting:
            return []
        behind, self.waiting = self.waiting, deque([self.waiting.popleft()])  # the head alone is offered
        admitted = super()._admit(now)
        self.waiting.extend(behind)
        return admitted


POLICIES: dict[str, type[Scheduler]] = {"step": Scheduler, "request": RequestLevelScheduler,
                                        "single": SingleRequestScheduler}


def use_policy(engine, policy: str) -> None:
    """Give ``engine`` (idle: nothing running or queued) a scheduler of batching ``policy`` (``POLICIES``)."""
    old = engine.scheduler
    if old.has_work():
        raise RuntimeError("the batching policy is switched only while the engine is idle")
    engine.scheduler = POLICIES[policy](old.max_rows, old.buckets, old.null_class, cache_rows=old.cache_scratch,
                                        compute_buckets=old.compute_buckets)
    engine.admission.stepped()  # the next estimate replays the new policy's admission

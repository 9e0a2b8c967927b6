"""Admission by time: the engine refuses a request whose estimated wait for a batch slot passes max_queue_wait_s (or
its deadline), with a Retry-After from the estimate; the estimate replays FIFO admission over the work ahead."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import pytest

from dit_runtime.engine import GenerationRequest, QueueFullError
from dit_runtime.engine.scheduler import RequestState, Scheduler
from serving.autoscaling import OCCUPANCY, QUEUE_WAIT, QueueWaitPolicy
from test_engine import make_engine


def state(rows_per_image: int, n: int, steps: int, done: int = 0) -> RequestState:
    guidance = 4.0 if rows_per_image == 2 else 1.0
    s = RequestState(GenerationRequest.of(1, n=n, num_inference_steps=steps, guidance_scale=guidance), seed=0,
                     submitted_at=0.0)
    s.step = done
    return s


def test_the_wait_replays_fifo_admission_over_the_work_ahead():
    scheduler = Scheduler(max_rows=8, buckets=(8,), null_class=10)
    a, b = state(2, 2, steps=12, done=2), state(2, 2, steps=5, done=2)  # 4 rows each: 10 and 3 steps left
    c = state(2, 2, steps=5)  # waits for b's rows, then holds them 5 steps
    assert scheduler.replay([a, b], []).wait(2) == 3  # b's rows free after 3 steps
    assert scheduler.replay([a, b], [c]).wait(2) == 8  # c takes b's rows at 3 and frees them at 8
    assert scheduler.replay([a], []).wait(2) == 0  # room now
    assert scheduler.replay([a, b], []).wait(8) == 10  # the whole batch: after both


def test_the_engine_keeps_its_replay_true_as_requests_queue_steps_run_and_requests_leave():
    """The engine replays the queue once per step and extends that replay by each request queued (not a replay per
    request): after every submit and every step its estimate equals a replay of the batch and queue from scratch."""
    engine = make_engine(max_batch_size=8, max_queue_size=1000)
    rng = random.Random(0)
    deepest = 0

    def from_scratch(rows: int) -> int:
        waiting = list(engine.scheduler.waiting) + engine._inbox
        return engine.scheduler.replay(list(engine.scheduler.running), waiting).wait(rows)

    handles = []
    for turn in range(40):
        for _ in range(rng.randrange(3)):
            request = GenerationRequest.of(rng.randrange(10), n=rng.choice([1, 2]), seed=turn,
                                           num_inference_steps=rng.randrange(2, 9),
                                           guidance_scale=rng.choice([1.0, 4.0]))
            handles.append(engine.submit(request, progress=False))
            for rows in (1, 2, 4):
                assert engine.admission.replay().wait(rows) == from_scratch(rows)
        if turn % 7 == 3 and handles:
            rng.choice(handles).cancel()  # dropped at the next step: the replay is rebuilt then
        deepest = max(deepest, len(engine.scheduler.waiting) + len(engine._inbox))
        engine._run_once()
        for rows in (1, 2, 4, 8):
            assert engine.admission.replay().wait(rows) == from_scratch(rows)
        assert engine.scheduler.waiting_images == sum(s.num_images for s in engine.scheduler.waiting)  # the guard's
    assert deepest >= 5  # a queue built up behind a full batch


def test_a_request_that_would_wait_past_the_bound_is_refused_with_the_estimated_retry_after():
    engine = make_engine(max_queue_wait_s=0.05).start()
    try:
        long = engine.submit(GenerationRequest.of(1, n=8, seed=0, num_inference_steps=1000))  # all 16 rows
        while engine.stats().running_requests == 0:
            time.sleep(0.001)
        wait = engine.estimated_wait(2)
        assert wait > 0.05 and engine.stats().estimated_wait_seconds > 0.05
        with pytest.raises(QueueFullError) as e:
            engine.submit(GenerationRequest.of(2, seed=1, num_inference_steps=5))
        assert "max_queue_wait_s of 0.05 s" in str(e.value)
        assert e.value.retry_after == pytest.approx(wait - 0.05, rel=0.5)  # the queue drains as the estimate says
        long.cancel()
        while engine.stats().running_requests:
            time.sleep(0.001)
        assert engine.submit(GenerationRequest.of(2, seed=1, num_inference_steps=5)).result(timeout=30)
    finally:
        engine.stop()


def test_a_request_that_would_wait_past_its_deadline_is_refused_at_once():
    engine = make_engine(max_queue_wait_s=1000.0).start()
    try:
        long = engine.submit(GenerationRequest.of(1, n=8, seed=0, num_inference_steps=1000))
        while engine.stats().running_requests == 0:
            time.sleep(0.001)
        assert engine.estimated_wait(2) > 0.2
        with pytest.raises(QueueFullError, match="past its deadline"):
            engine.submit(GenerationRequest.of(2, seed=1, num_inference_steps=5, deadline=time.time() + 0.2))
        queued = engine.submit(GenerationRequest.of(2, seed=1, num_inference_steps=5))  # no deadline: it waits
        long.cancel()
        assert queued.result(timeout=30)
    finally:
        engine.stop()


def test_the_autoscaling_policy_follows_the_wait_and_then_the_occupancy():
    policy = QueueWaitPolicy(target_queue_wait_s=1.0, target_occupancy=0.5)

    def decide(replicas: int, waits: list[float], occupancy: list[float]) -> float:
        ctx = SimpleNamespace(current_num_replicas=replicas, target_num_replicas=replicas, aggregated_metrics={
            QUEUE_WAIT: dict(enumerate(waits)), OCCUPANCY: dict(enumerate(occupancy))})
        return policy(ctx)[0]

    assert decide(1, [2.0], [1.0]) == 2.0  # waits twice the target: twice the replicas
    assert decide(2, [0.5, 0.5], [1.0, 1.0]) == 4.0  # full batches, short waits: occupancy 1 against 0.5
    assert decide(2, [0.0, 0.0], [0.1, 0.1]) == pytest.approx(0.4)  # idle: Ray rounds up to min_replicas
    assert decide(3, [], []) == 3  # nothing reported yet: hold

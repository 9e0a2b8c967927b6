"""Autoscaling a model deployment on the wait its engines estimate: the notion of load that admission uses.

Each replica reports (``ModelServer.record_autoscaling_stats``) its engine's estimated wait for a new one-image
request (``Engine.estimated_wait``) and the share of its batch rows in use. Ray Serve averages both over
``look_back_period_s`` and asks ``QueueWaitPolicy`` for a replica count; its own wrapper then applies the
deployment's ``min_replicas``/``max_replicas`` and up/downscale delays.

Why not Ray's default (requests in flight per replica against ``target_ongoing_requests``): a request in flight is a
different amount of work on each model, step count and batch size, so the right target has to be re-derived for
every deployment, and it says nothing about how long anyone waits. The wait estimate is in seconds, the unit
``max_queue_wait_s`` is written in: the policy aims at half of that bound, so a deployment grows before it sheds.
"""

from __future__ import annotations

import statistics

# The names of the two figures a replica reports.
QUEUE_WAIT = "queue_wait_s"
OCCUPANCY = "batch_occupancy"
# Share of the batch's rows in use the policy aims at when nobody waits: room for a burst without a wait.
TARGET_OCCUPANCY = 0.75


class QueueWaitPolicy:
    """Replicas in proportion to the pressure: the mean estimated wait against ``target_queue_wait_s``, or, when
    nobody waits, the mean batch occupancy against ``target_occupancy`` (so an idle deployment shrinks)."""

    def __init__(self, target_queue_wait_s: float, target_occupancy: float = TARGET_OCCUPANCY):
        if not target_queue_wait_s > 0 or not 0 < target_occupancy <= 1:
            raise ValueError(f"target_queue_wait_s must be > 0 and target_occupancy in (0, 1], got "
                             f"{target_queue_wait_s!r} and {target_occupancy!r}")
        self.target_queue_wait_s = target_queue_wait_s
        self.target_occupancy = target_occupancy

    def __call__(self, ctx) -> tuple[float, dict]:
        replicas = ctx.current_num_replicas
        metrics = ctx.aggregated_metrics or {}
        waits = list(metrics.get(QUEUE_WAIT, {}).values())
        occupancy = list(metrics.get(OCCUPANCY, {}).values())
        if not replicas or not occupancy:  # nothing reported yet (a replica starting): keep the count
            return ctx.target_num_replicas, {}
        return replicas * self.pressure(statistics.fmean(waits) if waits else 0.0, statistics.fmean(occupancy)), {}

    def pressure(self, queue_wait_s: float, occupancy: float) -> float:
        """Desired replicas per current replica."""
        return max(queue_wait_s / self.target_queue_wait_s, occupancy / self.target_occupancy)

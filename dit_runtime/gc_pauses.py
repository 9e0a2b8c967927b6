"""Timing the garbage collector's pauses, for the processes that must not stall unseen: a model replica (its
``dit_gc_pause_seconds``) and the benchmarks' load clients (their ``client_gc_max_ms``).

A collection holds the GIL, so every thread of the process waits it out: an engine's loop, the threads that encode,
the event loop. Freezing the heap built at start-up (``engine.freeze_startup_heap``) keeps the long ones away; this
says whether it did.
"""

from __future__ import annotations

import gc
import time
from collections import deque


class CollectionTimer:
    """This process's garbage collections, timed through ``gc.callbacks`` between ``start`` and ``stop``: each in
    ``pauses`` as (perf_counter reading at its end, generation, seconds).

    ``young_min_s`` leaves out the youngest generation's collections shorter than it: a busy server runs hundreds a
    second, each a fraction of a millisecond. A long-lived process ``drain``-s ``pauses``; ``keep`` bounds it (the
    oldest go first) should the draining stop.
    """

    def __init__(self, young_min_s: float = 0.0, keep: int | None = None):
        self.young_min_s = young_min_s
        self.pauses: deque[tuple[float, int, float]] = deque(maxlen=keep)
        self._started = 0.0

    def start(self) -> "CollectionTimer":
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        return self

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def drain(self) -> list[tuple[float, int, float]]:
        """The collections timed since the last drain, oldest first; ``pauses`` is left empty."""
        out = []
        while self.pauses:  # popleft is atomic: a collection on another thread may append meanwhile
            out.append(self.pauses.popleft())
        return out

    def _on_gc(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
        elif info["generation"] > 0 or now - self._started >= self.young_min_s:
            self.pauses.append((now, info["generation"], now - self._started))

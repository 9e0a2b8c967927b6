"""What stops every Python thread of a serving process, timed: the garbage collector's pauses (``CollectionTimer``:
a model replica's ``dit_gc_pause_seconds``, the benchmarks' load clients' ``client_gc_max_ms``) and any other hold of
the GIL (``StallWatch``: a replica's warnings, each with every thread's stack while it lasted).

A collection holds the GIL, so every thread of the process waits it out: an engine's loop, the threads that encode,
the event loop. Freezing the heap built at start-up (``engine.freeze_startup_heap``) keeps the long ones away; the
timer says whether it did. A C call that keeps the GIL, or a host that does not run the process, stops them as
well: the watch sees those too, and its stacks show where every thread was while it lasted.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import threading
import time
from collections import deque
from typing import TextIO


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


class StallWatch:
    """Holds of this process's Python threads, seen from a daemon thread that asks to wake every ``tick_s``: each
    time it woke ``min_s`` or more late is in ``stalls`` as (perf_counter reading at its end, seconds late). Late
    means it could not take the GIL (a collection, a C call that keeps it, other threads' turns with it) or the host
    did not run the process. Every thread that waited on the GIL meanwhile waited about as long; a hold that began
    within a tick is seen up to ``tick_s`` short, so each is a lower bound.

    With a ``file``, faulthandler's watchdog thread, which needs no GIL, writes every Python thread's stack to its
    descriptor once a hold has lasted ``dump_after_s``, while it still lasts: where each thread was, the holder among
    them (faulthandler cannot say which). The watch then writes a line after the stacks, to the same descriptor, with
    the hold's length and its end on the wall clock (``STALL_MARK`` starts it), so logs with times can be read
    against them. faulthandler has one such timer a process: while watching with a file, the watch owns it.

    A long-lived process ``drain``-s ``stalls``; ``keep`` bounds it (the oldest go first) should the draining stop.
    """

    STALL_MARK = "[stall-watch]"

    def __init__(self, tick_s: float = 0.02, min_s: float = 0.05, dump_after_s: float = 0.1,
                 file: TextIO | None = None, keep: int | None = None):
        if not tick_s > 0 or file is not None and not tick_s < dump_after_s:
            raise ValueError(f"tick_s ({tick_s}) must be above 0 and, with a file, below dump_after_s "
                             f"({dump_after_s}): the watch re-arms the stack dump every tick")
        self.tick_s, self.min_s, self.dump_after_s = tick_s, min_s, dump_after_s
        self.fd = file.fileno() if file is not None else None  # faulthandler writes here; no stream to flush
        self.stalls: deque[tuple[float, float]] = deque(maxlen=keep)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def dump_late_s(self) -> float:
        """How late the watch wakes from a hold whose stacks were written: ``dump_after_s`` after it armed."""
        return self.dump_after_s - self.tick_s

    def start(self) -> "StallWatch":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="dit-stall-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def drain(self) -> list[tuple[float, float]]:
        """The holds seen since the last drain, oldest first; ``stalls`` is left empty."""
        out = []
        while self.stalls:
            out.append(self.stalls.popleft())
        return out

    def _watch(self) -> None:
        try:
            while True:
                if self.fd is not None:  # re-arming cancels the last tick's: it fires only on a hold
                    faulthandler.dump_traceback_later(self.dump_after_s, file=self.fd)
                armed = time.perf_counter()  # after the re-arm: its own cost is not a hold
                if self._stop.wait(self.tick_s):
                    return
                now = time.perf_counter()
                late = now - armed - self.tick_s
                if late >= self.min_s:
                    self.stalls.append((now, late))
                if self.fd is not None and late >= self.dump_late_s:
                    self._mark(late)
        finally:
            if self.fd is not None:
                faulthandler.cancel_dump_traceback_later()

    def _mark(self, late: float) -> None:
        """The line after a hold's stacks, to their descriptor (a Ray replica's ``sys.stderr`` is a logger's stream,
        which would put it elsewhere). A descriptor that fails ends the dumps, not the watch."""
        ended = datetime.datetime.now().isoformat(sep=" ", timespec="milliseconds")
        try:
            os.write(self.fd, (f"{self.STALL_MARK} the process's Python threads were held off for {1e3 * late:.0f} "
                               f"ms, to {ended}; the stacks above were taken about "
                               f"{1e3 * self.dump_late_s:.0f} ms into it\n").encode())
        except OSError:
            faulthandler.cancel_dump_traceback_later()
            self.fd = None

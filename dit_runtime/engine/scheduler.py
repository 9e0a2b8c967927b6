"""The scheduler: plain Python that decides which images run in the next step. No tensors here.

Each step the scheduler drops cancelled and expired requests, admits waiting requests in FIFO order while their
rows fit (``GenerationRequest.rows``; a caching request also needs its rows of the feature cache's pool), and lays
out the forward pass: which slot each image position reads, which rows belong to which image, which cache entry
each row owns, and how many rows run the blocks this step (``CachePolicy``'s rule, the one the runner applies on
the device). The runner executes that plan; ``update`` then advances every running request by one step and
retires the finished ones at once, returning their slots and cache entries.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from ..request import GenerationRequest
from .admission import AdmissionReplay
from .types import DeadlineExceededError, EngineError, RequestCancelledError


@dataclass
class RequestState:
    """A request's place in the engine: its slots, progress and timings."""

    request: GenerationRequest
    seed: int  # the request's, or the one the engine drew for it
    submitted_at: float  # time.monotonic()
    slots: list[int] = field(default_factory=list)
    cache_entries: list[int] = field(default_factory=list)  # one per row while it holds feature-cache rows
    step: int = 0
    admitted_at: float | None = None
    cancelled: bool = False
    # The request's, read here once: the scheduler reads them several times per step for each request it holds.
    num_images: int = field(init=False)
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_images, self.rows = self.request.num_images, self.request.rows

    @property
    def done(self) -> bool:
        return self.step >= self.request.sampling.num_inference_steps

    @property
    def caches(self) -> bool:
        return self.request.sampling.cache_policy.caches

    @property
    def is_full_step(self) -> bool:
        """Whether this request's rows run the blocks at its current step."""
        s = self.request.sampling
        return s.cache_policy.is_full_step(self.step, s.num_inference_steps)


@dataclass
class Layout:
    """Where each image and row sits in one forward pass (all lists are of length ``bucket``).

    image_slot[i]: state slot of image position i (``dummy_slot`` for padding); row_image[r]: image position that
    row r reads; row_label[r]: its class label (the null class for guidance rows and padding);
    cond_row[i] / uncond_row[i]: the rows holding image i's conditional and null outputs (equal when unguided);
    row_cache[r]: the feature-cache entry row r owns (the pool's scratch entry for rows without one, and padding).
    """

    bucket: int
    rows: int  # real rows (the rest is padding)
    images: int
    image_slot: list[int]
    row_image: list[int]
    row_label: list[int]
    cond_row: list[int]
    uncond_row: list[int]
    row_cache: list[int]


@dataclass
class StepPlan:
    """The scheduler's output for one step."""

    admitted: list[RequestState]  # newly admitted this step: their slots need initial noise
    running: list[RequestState]  # every request that advances this step (admitted ones included)
    aborted: list[tuple[RequestState, EngineError]]  # left the engine without finishing
    layout: Layout | None  # None when nothing runs
    layout_changed: bool
    compute_rows: int = 0  # real rows that run the blocks this step
    compute_bucket: int = 0  # those rows after padding (0: none)
    updated_bucket: int = 0  # the full rows that have a feature-cache entry, after padding (0: none)
    rows_by_cache: tuple[tuple[str, int, int], ...] = ()  # per `cache` preset: (preset, computed, skipped) rows


class Scheduler:
    """FIFO admission into a fixed number of rows, with a bounded waiting queue."""

    replay_type: type[AdmissionReplay] = AdmissionReplay  # replays this scheduler's admission rule

    def __init__(self, max_rows: int, buckets: tuple[int, ...], null_class: int, cache_rows: int = 0,
                 compute_buckets: tuple[int, ...] | None = None):
        self.max_rows = max_rows
        self.compute_buckets = compute_buckets or buckets
        self.buckets = buckets
        self.null_class = null_class
        self.num_slots = max_rows  # an image takes at least one row
        self.dummy_slot = max_rows  # padding positions read and write this scratch slot
        self.waiting: deque[RequestState] = deque()
        self._waiting_images = 0  # kept with the queue: the engine's memory guard reads it at every submit
        self.running: list[RequestState] = []
        self._free_slots = list(range(self.num_slots - 1, -1, -1))  # pop() gives the lowest slot
        self.cache_scratch = cache_rows  # the entry of rows without a cache, and of padding
        self._free_entries = list(range(cache_rows - 1, -1, -1))
        self._layout: Layout | None = None
        self._changed = True
        # What may leave the queue before its turn, so that a step looks at those and not at every waiting request
        # (a few thousand queued few-step requests made that scan a step's longest part): cancellations since the
        # last step, and a heap of (deadline, arrival, state) of the requests queued with one.
        self._cancelled: list[RequestState] = []
        self._deadlines: list[tuple[float, int, RequestState]] = []
        self._arrivals = itertools.count()

    # ---- queue ------------------------------------------------------------------------------------------------
    def add(self, state: RequestState) -> None:
        self.waiting.append(state)
        self._waiting_images += state.num_images
        if state.request.deadline is not None:
            heapq.heappush(self._deadlines, (state.request.deadline, next(self._arrivals), state))

    def cancel(self, state: RequestState) -> None:
        """``state`` was cancelled (``state.cancelled`` is set): it leaves the queue or the batch at the next step."""
        self._cancelled.append(state)

    @property
    def waiting_images(self) -> int:
        return self._waiting_images

    @property
    def running_images(self) -> int:
        return sum(s.num_images for s in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def replay(self, running: list[RequestState], waiting: list[RequestState]) -> AdmissionReplay:
        """FIFO admission replayed over ``running``'s remaining steps and ``waiting``'s step counts, in order (see
        ``AdmissionReplay``; cancellations and deadlines not foreseen). Reads snapshots, so other threads may call
        it."""
        return self.replay_type.of(self.max_rows,
                                   [(s.rows, s.request.sampling.num_inference_steps - s.step) for s in running],
                                   [(s.rows, s.request.sampling.num_inference_steps) for s in waiting])

    # ---- one step ---------------------------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> StepPlan:
        """Drop what was cancelled or expired, admit what fits, and lay out the next forward pass.

        ``now`` (time.monotonic()) stamps admissions; deadlines are Unix times, read against the wall clock."""
        now = time.monotonic() if now is None else now
        wall = time.time()
        aborted: list[tuple[RequestState, EngineError]] = []

        def reason(state: RequestState) -> EngineError | None:
            if state.cancelled:
                return RequestCancelledError(f"request {state.request.request_id} was cancelled")
            deadline = state.request.deadline
            if deadline is not None and wall >= deadline:
                where = "waiting in the queue" if state.admitted_at is None else f"at step {state.step}"
                return DeadlineExceededError(f"request {state.request.request_id} passed its deadline {where}")
            return None

        kept = []
        for state in self.running:  # at most max_rows of them: each is checked
            err = reason(state)
            if err is None:
                kept.append(state)
            else:
                aborted.append((state, err))
                self._release(state)
        self.running = kept
        leaving = {id(s): s for s in self._cancelled if s.admitted_at is None}  # the queue's: only these are looked at
        self._cancelled = []
        while self._deadlines and wall >= self._deadlines[0][0]:
            state = heapq.heappop(self._deadlines)[2]
            if state.admitted_at is None:
                leaving[id(state)] = state
        if leaving:
            waiting = deque()
            for state in self.waiting:
                if id(state) in leaving:
                    aborted.append((state, reason(state)))
                    self._waiting_images -= state.num_images
                else:
                    waiting.append(state)
            self.waiting = waiting
        if len(self._deadlines) > 2 * len(self.waiting) + 64:  # drop the entries of those admitted or cancelled
            self._deadlines = [entry for entry in self._deadlines
                               if entry[2].admitted_at is None and not entry[2].cancelled]
            heapq.heapify(self._deadlines)

        admitted = self._admit(now)
        if admitted or aborted:
            self._changed = True
        if self._changed:
            self._layout = self._make_layout() if self.running else None
        by_cache: dict[str, list[int]] = {}  # preset -> [rows that run the blocks, rows that forecast them]
        updated = 0  # full rows with a cache entry: their entries are written this step
        for state in self.running:
            full = state.is_full_step
            by_cache.setdefault(state.request.sampling.cache, [0, 0])[0 if full else 1] += state.rows
            updated += state.rows if full and state.cache_entries else 0
        compute = sum(computed for computed, _ in by_cache.values())
        plan = StepPlan(admitted=admitted, running=list(self.running), aborted=aborted, layout=self._layout,
                        layout_changed=self._changed, compute_rows=compute,
                        compute_bucket=self._compute_bucket(compute), updated_bucket=self._compute_bucket(updated),
                        rows_by_cache=tuple((name, c, f) for name, (c, f) in sorted(by_cache.items())))
        self._changed = False
        return plan

    def _compute_bucket(self, rows: int) -> int:
        return next(b for b in self.compute_buckets if b >= rows) if rows else 0

    def _admit(self, now: float) -> list[RequestState]:
        """Admit waiting requests in FIFO order while their rows, slots and cache entries fit."""
        admitted = []
        rows = sum(s.rows for s in self.running)
        while self.waiting:
            head = self.waiting[0]
            entries = head.rows if head.caches else 0
            if rows + head.rows > self.max_rows or head.num_images > len(self._free_slots) \
                    or entries > len(self._free_entries):
                break  # FIFO: nothing overtakes the head of the queue
            self.waiting.popleft()
            self._waiting_images -= head.num_images
            head.slots = [self._free_slots.pop() for _ in range(head.num_images)]
            head.cache_entries = [self._free_entries.pop() for _ in range(entries)]
            head.admitted_at = now
            rows += head.rows
            self.running.append(head)
            admitted.append(head)
        return admitted

    def _make_layout(self) -> Layout:
        images = self.running_images
        rows = sum(s.rows for s in self.running)
        bucket = next(b for b in self.buckets if b >= rows)
        image_slot, row_image, row_label, row_cache = [], [], [], []
        guided_images = []  # (image position, its null row's cache entry)
        for state in self.running:
            entries = state.cache_entries or [self.cache_scratch] * state.rows
            n = state.num_images
            for k, (slot, label) in enumerate(zip(state.slots, state.request.class_ids)):
                if state.request.sampling.null_row:
                    guided_images.append((len(image_slot), entries[n + k]))
                image_slot.append(slot)
                row_image.append(len(row_image))
                row_label.append(label)
                row_cache.append(entries[k])
        cond_row = list(range(images))
        uncond_row = list(range(images))
        for i, entry in guided_images:  # null rows follow the conditional ones
            uncond_row[i] = len(row_image)
            row_image.append(i)
            row_label.append(self.null_class)
            row_cache.append(entry)
        pad_images, pad_rows = bucket - images, bucket - rows
        return Layout(bucket=bucket, rows=rows, images=images,
                      image_slot=image_slot + [self.dummy_slot] * pad_images,
                      row_image=row_image + [0] * pad_rows,
                      row_label=row_label + [self.null_class] * pad_rows,
                      cond_row=cond_row + [0] * pad_images, uncond_row=uncond_row + [0] * pad_images,
                      row_cache=row_cache + [self.cache_scratch] * pad_rows)

    def update(self, plan: StepPlan) -> list[RequestState]:
        """Advance every request that ran by one step; return (and release) the finished ones."""
        finished = []
        for state in plan.running:
            state.step += 1
            if state.done:
                finished.append(state)
        if finished:
            done_ids = {id(s) for s in finished}
            self.running = [s for s in self.running if id(s) not in done_ids]
            for state in finished:
                self._release(state)
            self._changed = True
        return finished

    def _release(self, state: RequestState) -> None:
        """Return a request's slots and cache entries to their pools; ``state.slots`` still names its slots so its
        output can be read."""
        self._free_slots.extend(state.slots)
        self._free_slots.sort(reverse=True)
        self._free_entries.extend(state.cache_entries)
        self._free_entries.sort(reverse=True)
        state.cache_entries = []

    @property
    def free_cache_rows(self) -> int:
        return len(self._free_entries)

    def abort_running(self, error: EngineError) -> list[tuple[RequestState, EngineError]]:
        """Remove the running requests (their step failed); the waiting ones stay queued."""
        out = [(s, error) for s in self.running]
        for state, _ in out:
            self._release(state)
        self.running = []
        self._changed = True
        return out

    def abort_all(self, error: EngineError) -> list[tuple[RequestState, EngineError]]:
        """Remove every request (engine shutdown or failure)."""
        out = self.abort_running(error) + [(s, error) for s in self.waiting]
        self.waiting = deque()
        self._waiting_images = 0
        self._cancelled, self._deadlines = [], []
        return out

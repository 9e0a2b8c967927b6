"""What stops a process's Python threads, timed: the collector's pauses (a replica's dit_gc_pause_seconds, a load
client's report) and any hold of the GIL (a replica's stall warnings, with the holder's stack)."""

from __future__ import annotations

import gc
import time

import pytest
from model_helpers import hold_the_gil

from dit_runtime.pauses import CollectionTimer, StallWatch


def test_each_collection_is_timed_with_its_generation_and_short_young_ones_are_left_out():
    timer = CollectionTimer(young_min_s=10.0).start()
    try:
        for generation in (0, 1, 2):
            gc.collect(generation)
    finally:
        timer.stop()
    pauses = timer.drain()
    generations = [g for _, g, _ in pauses]
    assert 1 in generations and 2 in generations  # another thread's collections may come between
    assert 0 not in generations  # none of this process's young collections takes 10 s
    assert all(seconds >= 0 for _, _, seconds in pauses)
    assert [end for end, _, _ in pauses] == sorted(end for end, _, _ in pauses)
    assert not timer.pauses  # drained
    gc.collect()
    assert not timer.pauses  # stopped


def test_without_a_floor_every_collection_is_kept():
    timer = CollectionTimer().start()
    try:
        gc.collect(0)
    finally:
        timer.stop()
    assert 0 in [g for _, g, _ in timer.drain()]


def test_a_hold_of_the_gil_is_timed_and_its_holder_named_by_the_stacks(tmp_path):
    with open(tmp_path / "stalls.txt", "w") as file:
        watch = StallWatch(tick_s=0.01, min_s=0.05, dump_after_s=0.1, file=file).start()
        try:
            time.sleep(0.1)  # the watch is in its loop
            hold_the_gil(0.4)
            time.sleep(0.1)  # it wakes, records the hold and marks the stacks
        finally:
            watch.stop()
    stalls = watch.drain()
    assert max(seconds for _, seconds in stalls) >= 0.3
    text = (tmp_path / "stalls.txt").read_text()
    # faulthandler's dump, taken while the holder held, then the watch's line; a slow host may add other holds
    blocks = text.split(StallWatch.STALL_MARK)
    held = [i for i, dump in enumerate(blocks[:-1]) if "Timeout (" in dump and "in hold_the_gil" in dump]
    assert held, text
    assert blocks[held[0] + 1].startswith(" the process's Python threads were held off for")


def test_the_watch_stops_and_no_dump_is_left_armed(tmp_path):
    with open(tmp_path / "stalls.txt", "w") as file:
        watch = StallWatch(tick_s=0.01, dump_after_s=1.0, file=file).start()
        time.sleep(0.05)
        watch.stop()
        time.sleep(1.5)  # longer than dump_after_s: an armed dump would have fired by now
    assert (tmp_path / "stalls.txt").read_text() == ""


def test_a_tick_no_shorter_than_the_dump_is_refused(tmp_path):
    with open(tmp_path / "stalls.txt", "w") as file, pytest.raises(ValueError, match="tick_s"):
        StallWatch(tick_s=0.2, dump_after_s=0.1, file=file)
    with pytest.raises(ValueError, match="tick_s"):
        StallWatch(tick_s=0)
    StallWatch(tick_s=0.2, dump_after_s=0.1)  # no dumps without a file: any tick

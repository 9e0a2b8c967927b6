"""The collector's pauses, timed: what a replica exports as dit_gc_pause_seconds and a load client reports."""

from __future__ import annotations

import gc

from dit_runtime.gc_pauses import CollectionTimer


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

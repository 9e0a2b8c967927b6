"""The model server's handler in this process (no Ray cluster, no HTTP): where an answer is encoded changes nothing."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time

import pytest
from model_helpers import hold_the_gil
from serve_helpers import model_args

from dit_runtime import images
from serving import model_server
from serving.backend import EncodedImages
from serving.config import AppArgs
from serving.errors import APIError
from serving.model_server import ModelServer


@pytest.fixture(scope="module")
def server(checkpoints):
    args = AppArgs.parse({"models": [model_args("digits-s", checkpoints["digits-s"])]})
    srv = ModelServer(args.models[0], args.limits)
    assert srv.engine is not None, srv.load_error
    yield srv
    srv.__del__()
    gc.unfreeze()  # the replica froze this test process's heap; the other tests' garbage is collected as before


def test_a_warm_replica_puts_its_start_up_heap_out_of_the_collectors_reach(server):
    tracked = gc.get_objects()  # the generations a collection walks; frozen objects are in none of them
    assert not any(o is server.engine or o is server.engine.runner for o in tracked)
    assert gc.get_freeze_count() > 0


def test_a_warm_replica_times_its_collections_and_warns_of_a_slow_one(server, caplog):
    assert server._collections._on_gc in gc.callbacks  # started once the start-up heap was frozen
    ray_serve = logging.getLogger("ray.serve")  # Ray's own handlers, not propagated to the root logger
    ray_serve.addHandler(caplog.handler)
    try:
        server._record_collections([(0.0, 1, 0.001), (0.0, 2, model_server.SLOW_COLLECTION_S),
                                    (0.0, 0, model_server.SLOW_COLLECTION_S)])  # a slow young one: logged too
    finally:
        ray_serve.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "generation 2" in warnings[0] and "generation 0" in warnings[1], warnings
    assert f"{1e3 * model_server.SLOW_COLLECTION_S:.0f} ms" in warnings[0]


def test_a_warm_replica_warns_when_all_its_threads_were_held_off(server, caplog):
    ray_serve = logging.getLogger("ray.serve")
    ray_serve.addHandler(caplog.handler)
    try:
        hold_the_gil(0.3)
        deadline = time.monotonic() + 5 * model_server.LOAD_REFRESH_S  # its refresher drains the watch
        while time.monotonic() < deadline and not any("held off" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    finally:
        ray_serve.removeHandler(caplog.handler)
    held = [r for r in caplog.records if "held off" in r.getMessage()]
    assert held and all(r.levelno == logging.WARNING for r in held), caplog.records
    held = [r.getMessage() for r in held]
    longest = max(float(m.split("the longest ")[1].split(" ms")[0]) for m in held)
    assert longest >= 250, held


def test_a_replica_warns_of_a_second_whose_holds_add_up_to_the_warning_bar_only(server, caplog):
    """Holds of STALL_MIN_S (two of the interpreter's switch intervals) are counted; a second's warning waits until
    they add up to STALL_WARN_S, so threads taking turns with the GIL now and then do not log every second."""
    ray_serve = logging.getLogger("ray.serve")
    ray_serve.addHandler(caplog.handler)
    short = 0.3 * model_server.STALL_WARN_S  # two add up to less than the bar, four to more
    try:
        server._record_stalls([(0.0, short), (0.1, short)])
        server._record_stalls([(0.0, short), (0.1, short), (0.2, short), (0.3, short)])
    finally:
        ray_serve.removeHandler(caplog.handler)
    # the replica's own watch may warn meanwhile of a real hold: these are told apart by their counts
    held = [r.getMessage() for r in caplog.records if f"the longest {1e3 * short:.0f} ms" in r.getMessage()]
    min_ms = f"{1e3 * model_server.STALL_MIN_S:.0f} ms or more"
    assert [m for m in held if f"(2 holds of {min_ms}" in m] == [], held
    assert len([m for m in held if f"(4 holds of {min_ms}" in m]) == 1, held


def generate(server: ModelServer, size: str | None = None, **fields) -> EncodedImages | APIError:
    request = server.model_spec.build_request(**{"prompt": "3", "num_inference_steps": 4, "seed": 5,
                                                 "deadline": time.time() + 60, **fields}, size=size)
    return asyncio.run(server.generate(request))


@pytest.mark.parametrize("fields", [{}, {"n": 3}, {"size": "32x32"}])
def test_an_answer_is_the_same_encoded_on_the_loop_or_in_an_encoder_thread(server, monkeypatch, fields):
    on_loop = generate(server, **fields)
    request = server.model_spec.build_request(prompt="3", n=fields.get("n", 1), size=fields.get("size"))
    assert server._encodes_inline(request)  # the default path: the loop
    monkeypatch.setattr(model_server, "INLINE_ENCODE_MAX_PIXELS", 0)  # every answer through a thread
    assert not server._encodes_inline(request)
    in_thread = generate(server, **fields)
    assert len(on_loop.b64_images) == fields.get("n", 1) and server.model_spec.resolution == 16
    assert in_thread.b64_images == on_loop.b64_images and in_thread.seed == on_loop.seed == 5


def test_the_encoder_pools_take_the_process_cores_up_to_their_cap_unless_configured(server, checkpoints):
    cores = len(os.sched_getaffinity(0))
    expected = min(cores, images.MAX_ENCODE_THREADS)
    assert server._encoder._max_workers == server._deflater._max_workers == expected
    args = AppArgs.parse({"models": [model_args("digits-s", checkpoints["digits-s"], encode_threads=cores + 3)]})
    configured = ModelServer(args.models[0], args.limits)
    try:
        assert configured._encoder._max_workers == configured._deflater._max_workers == cores + 3
    finally:
        configured.__del__()


def test_an_engine_error_comes_back_as_an_api_error_on_both_paths(server, monkeypatch):
    for limit in (model_server.INLINE_ENCODE_MAX_PIXELS, 0):
        monkeypatch.setattr(model_server, "INLINE_ENCODE_MAX_PIXELS", limit)
        answer = generate(server, num_inference_steps=100, deadline=time.time() + 0.01)
        assert isinstance(answer, APIError) and answer.code == "deadline_exceeded" and answer.status == 504


def test_the_replica_reports_where_its_start_went(server):
    """What /readyz and the gauge dit_replica_startup_seconds show: the phases of this replica's start."""
    startup = server.startup
    phases = startup.phases()
    assert set(phases) == {"before_init", "verify", "load", "compile", "capture", "decoder", "total"}  # on Linux
    assert all(seconds >= 0 for seconds in phases.values()), phases
    assert startup.capture == 0  # no CUDA graphs on the CPU
    # The compile phase is the warm-up's first call of each part, within the warm-up's time per bucket.
    assert 0 < startup.compile <= sum(server.engine.warmup_seconds.values())
    # This process (pytest's) started before the server did, and has run longer than the server's start.
    assert 0 < startup.before_init < model_server.process_age_seconds() - startup.total
    assert asyncio.run(server.ready()).startup is startup


def test_jpeg_of_a_four_channel_answer_is_refused_naming_the_field():
    """A latent model served without its VAE (random weights, for benchmarks) answers the 4-channel latent view:
    PNG and WebP hold it, JPEG does not, and the request says so with a 400 before any denoising."""
    args = AppArgs.parse({"models": [{"name": "latent", "preset": "dit-tiny", "allow_random_weights": True,
                                      "max_batch_size": 4}]})
    srv = ModelServer(args.models[0], args.limits)
    try:
        assert srv.engine is not None, srv.load_error
        answer = generate(srv, prompt="0", output_format="jpeg")
        assert isinstance(answer, APIError) and answer.status == 400 and answer.param == "output_format"
        assert "png or webp" in answer.message and srv.engine.stats().steps_done == 0
        assert generate(srv, prompt="0", output_format="webp").output_format == "webp"
    finally:
        srv.__del__()


def test_random_weights_serve_as_a_student_for_benchmarks_of_the_served_path():
    """`random_weights_as: student` serves a preset's random weights under a 4-step student's contract: one row per
    guided image, and only the student's step counts (what `benchmarks serve --student` times on a GPU)."""
    args = AppArgs.parse({"models": [{"name": "student", "preset": "dit-tiny", "allow_random_weights": True,
                                      "random_weights_as": "student", "max_batch_size": 4}]})
    srv = ModelServer(args.models[0], args.limits)
    try:
        assert srv.engine is not None, srv.load_error
        contract = srv.model_spec.contract
        assert contract.guidance == "embedded" and contract.defaults.num_inference_steps == 4
        assert generate(srv, prompt="0", guidance_scale=4.0).output_format == "png"
        assert srv.engine.stats().steps_done == 4  # one row, four steps
        with pytest.raises(Exception, match="num_inference_steps"):
            generate(srv, prompt="0", num_inference_steps=25)
    finally:
        srv.__del__()
    with pytest.raises(ValueError, match="random_weights_as applies to `preset`"):
        AppArgs.parse({"models": [{"name": "x", "checkpoint": "checkpoints/digits-s.safetensors",
                                   "random_weights_as": "student"}]})

"""The inference engine on the CPU: step-level batching, per-request independence, cancel, deadlines, limits."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from dit_runtime.checkpoint import CheckpointInfo, default_class_names
from dit_runtime.diffusion import INITIAL_NOISE_COUNTER, counter_noise, noise_key
from dit_runtime.engine import (DeadlineExceededError, Engine, EngineConfig, GenerationRequest, GenerationResult,
                                InvalidRequestError, QueueFullError, RequestCancelledError, SamplingParams, StepEvent)
from dit_runtime.engine.fast_paths import FastPaths
from dit_runtime.engine.process_settings import configure_compile
from dit_runtime.engine.runner import IMAGE_SLOT, ROW_LABEL, ROW_REAL, AdmitColumn, ModelRunner
from dit_runtime.engine.scheduler import Layout, RequestState, Scheduler
from dit_runtime.model import DiTModel, get_preset
from dit_runtime.request import CACHE_POLICIES
from model_helpers import model_reordering_tolerance, reference_sample


def every_size_in(precision: str) -> FastPaths:
    """The fast paths that run ``precision`` at every size: dit-tiny's forwards are all below fp8_min_rows."""
    return FastPaths(fp8_min_rows=0) if precision == "fp8" else FastPaths()


def random_model(seed: int = 0) -> DiTModel:
    """dit-tiny (learned sigma, 4 channels, guidance) with every weight non-zero, so each layer matters."""
    torch.manual_seed(seed)
    model = DiTModel.from_config(get_preset("dit-tiny"))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.reset_pos_embed()
    return model.eval()


def make_engine(space: str = "latent", **config) -> Engine:
    model = random_model()
    info = CheckpointInfo(config=model.config, class_names=default_class_names(10), space=space)
    config.setdefault("max_batch_size", 16)
    return Engine(model, info, EngineConfig(**config))


@pytest.fixture
def engine():
    eng = make_engine().start()
    yield eng
    eng.stop()


@pytest.mark.numerics
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_engine_matches_plain_per_request_sampling_loop(engine, sampler):
    request = GenerationRequest((2, 7), SamplingParams(seed=11, num_inference_steps=8, sampler=sampler,
                                                       guidance_scale=3.0, eta=0.5))
    result = engine.submit(request).result(timeout=30)
    expected = reference_sample(random_model(), request)
    # Not bit-equal: the reference multiplies 4-row matrices, the engine a 16-row bucket, which BLAS may sum in
    # another order; 8 chained forwards bound the difference (tests/model_helpers.py). A wrong sampler, guidance or
    # noise stream moves the latents by far more.
    rel = np.linalg.norm(result.latents - expected) / np.linalg.norm(expected)
    assert rel < model_reordering_tolerance(get_preset("dit-tiny"), steps=8), rel


@pytest.mark.numerics
def test_request_result_independent_of_batch_neighbours(engine):
    """Exactly equal in fp32 on the CPU: the same request alone, and inside a busy mixed batch.

    Exact because this engine has one bucket (max_batch_size 16 is also the CPU's smallest bucket): every forward
    is a batch of 16 rows, so the probe's rows meet the same kernels at the same shapes alone and in the crowd, and
    every operation of the step works row by row (a GEMM sums each output row in the same order wherever the row
    sits). Across buckets BLAS makes no such promise; see test_engine_matches_plain_per_request_sampling_loop.
    """
    def probe():
        return GenerationRequest.of(3, n=2, seed=1234, num_inference_steps=12,
                                 sampler="dpm-solver++", guidance_scale=4.0)

    assert engine.config.buckets == (16,)  # the premise of exactness, above
    alone = engine.submit(probe()).result(timeout=30).latents
    neighbours = [engine.submit(GenerationRequest.of(i % 10, n=1 + i % 3, seed=i,
                                                  num_inference_steps=6 + 5 * i, sampler=["ddpm", "ddim"][i % 2],
                                                  guidance_scale=[1.0, 2.5][i % 2], eta=0.3))
                  for i in range(4)]
    time.sleep(0.05)  # let the neighbours get a few steps ahead, so the probe joins mid-flight
    busy = engine.submit(probe())
    late = engine.submit(GenerationRequest.of(9, n=2, seed=5, num_inference_steps=20))
    in_batch = busy.result(timeout=30).latents
    for h in neighbours + [late]:
        h.result(timeout=30)
    assert np.array_equal(alone, in_batch)
    other_seed = engine.submit(GenerationRequest.of(3, n=2, seed=1235,
                                                 num_inference_steps=12)).result(timeout=30).latents
    assert not np.allclose(alone, other_seed)  # the comparison above can fail: seeds do change the images


@pytest.mark.numerics
def test_image_noise_depends_only_on_seed_and_index(engine):
    """Image 0 of a one-image and of a three-image request: bit for bit, as both run in 16-row forwards (see
    test_request_result_independent_of_batch_neighbours)."""
    one = engine.submit(GenerationRequest.of(4, n=1, seed=99, num_inference_steps=5))
    three = engine.submit(GenerationRequest.of(4, n=3, seed=99, num_inference_steps=5))
    a, b = one.result(timeout=30).latents, three.result(timeout=30).latents
    assert np.array_equal(a[0], b[0])
    assert not np.allclose(b[0], b[1])


def test_stream_yields_every_step_then_the_images(engine):
    events = list(engine.submit(GenerationRequest.of(1, n=1, seed=0, num_inference_steps=7)))
    assert [e.step for e in events[:-1]] == list(range(1, 8))
    assert all(isinstance(e, StepEvent) and e.num_steps == 7 for e in events[:-1])
    assert isinstance(events[-1], GenerationResult) and events[-1].seed == 0


@pytest.mark.numerics
def test_a_handle_without_progress_yields_only_the_same_result(engine):
    request = GenerationRequest.of(1, n=1, seed=0, num_inference_steps=7)
    streamed = list(engine.submit(request))[-1]
    events = list(engine.submit(request, progress=False))
    assert len(events) == 1 and isinstance(events[0], GenerationResult)
    assert np.array_equal(events[0].latents, streamed.latents)


def test_async_iteration_streams_events():
    import asyncio

    async def run(eng):
        handle = eng.submit(GenerationRequest.of(1, seed=0, num_inference_steps=4))
        return [e async for e in handle]

    with make_engine() as eng:
        events = asyncio.run(run(eng))
    assert len(events) == 5 and isinstance(events[-1], GenerationResult)


def test_on_finish_calls_back_once_with_the_result_or_the_error(engine):
    import threading

    seen, done = [], threading.Event()

    def record(outcome):
        seen.append((threading.current_thread().name, outcome))
        done.set()

    ok = engine.submit(GenerationRequest.of(1, seed=0, num_inference_steps=3), progress=False)
    ok.on_finish(record)
    result = ok.result(timeout=30)
    assert done.wait(30) and len(seen) == 1
    assert seen[0][0] == "dit-engine" and seen[0][1] is result  # on the engine thread, the very result
    late = []
    ok.on_finish(late.append)  # registered after the end: called at once, here
    assert late == [result]

    def broken(outcome):
        raise RuntimeError("a caller's bug")

    failing = engine.submit(GenerationRequest.of(1, seed=0, num_inference_steps=1000,
                                              deadline=time.time() + 0.2))
    errors = []
    failing.on_finish(broken)  # logged; neither the engine nor the next callback is hurt
    failing.on_finish(errors.append)
    with pytest.raises(DeadlineExceededError):
        failing.result(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], DeadlineExceededError)
    assert engine.submit(GenerationRequest.of(2, seed=1, num_inference_steps=2)).result(timeout=30)


@pytest.mark.numerics
def test_result_async_returns_the_images_or_raises_the_error(engine):
    import asyncio

    async def run():
        ok = engine.submit(GenerationRequest.of(1, seed=0, num_inference_steps=3), progress=False)
        result = await ok.result_async()
        late = await ok.result_async()  # after the end: at once, the same result
        failing = engine.submit(GenerationRequest.of(1, seed=0, num_inference_steps=1000,
                                                  deadline=time.time() + 0.2), progress=False)
        with pytest.raises(DeadlineExceededError):
            await failing.result_async()
        return result, late

    result, late = asyncio.run(run())
    assert late is result and result.seed == 0
    reference = engine.submit(GenerationRequest.of(1, seed=0, num_inference_steps=3)).result(timeout=30)
    assert np.array_equal(result.latents, reference.latents)


def test_one_forward_per_step_serves_requests_at_different_steps():
    steps = []
    eng = make_engine()
    eng.on_step = steps.append
    with eng:
        long = eng.submit(GenerationRequest.of(0, n=1, seed=0, num_inference_steps=60,
                                            guidance_scale=1.0))
        while eng.stats().steps_done < 5:
            time.sleep(0.001)
        short = eng.submit(GenerationRequest.of(1, n=2, seed=1, num_inference_steps=5,
                                             guidance_scale=1.0))
        short_result = short.result(timeout=30)
        assert eng.stats().running_requests == 1, "the short request must leave as soon as it is done"
        long.result(timeout=30)
    # The short request joined the running one: some steps ran 3 images (1 + 2) in one forward pass...
    assert any(s.images == 3 and s.rows == 3 for s in steps)
    # ...and it finished long before the long one, which took 60 steps in all.
    assert short_result.denoise_seconds < sum(s.duration_seconds for s in steps)
    assert sum(1 for s in steps if s.images == 3) == 5


def test_guided_images_take_a_null_row_in_the_same_forward():
    steps = []
    with make_engine() as eng:
        eng.on_step = steps.append
        eng.submit(GenerationRequest.of(2, n=3, seed=0, num_inference_steps=3,
                                     guidance_scale=4.0)).result(timeout=30)
    assert {(s.images, s.rows) for s in steps} == {(3, 6)}


def test_cancel_takes_images_out_of_the_batch_within_one_step():
    steps = []
    eng = make_engine()
    eng.on_step = steps.append
    keep = eng.submit(GenerationRequest.of(0, seed=0, num_inference_steps=400, guidance_scale=1.0))
    drop = eng.submit(GenerationRequest.of(1, n=3, seed=1, num_inference_steps=400,
                                        guidance_scale=1.0))
    with eng:  # both are queued before the loop starts, so they share the first step
        while eng.stats().steps_done < 3:
            time.sleep(0.001)
        drop.cancel()
        cancelled_at = eng.stats().steps_done
        with pytest.raises(RequestCancelledError):
            drop.result(timeout=30)
        keep.cancel()
    after = steps[cancelled_at + 1:]
    assert steps[0].images == 4 and after and all(s.images <= 1 for s in after)


def test_a_queued_request_that_is_cancelled_or_expires_leaves_the_queue_and_the_rest_keep_their_order():
    scheduler = Scheduler(max_rows=2, buckets=(2,), null_class=10)

    def queued(deadline: float | None = None) -> RequestState:
        state = RequestState(GenerationRequest.of(0, num_inference_steps=5, guidance_scale=1.0, deadline=deadline),
                             seed=0, submitted_at=0.0)
        scheduler.add(state)
        return state

    running = [queued(), queued()]  # the batch's two rows
    assert scheduler.schedule().admitted == running
    a, b, c, d = queued(), queued(deadline=time.time() - 1), queued(), queued(deadline=time.time() + 3600)
    a.cancelled = True
    scheduler.cancel(a)
    plan = scheduler.schedule()
    assert [(s, type(e)) for s, e in plan.aborted] == [(a, RequestCancelledError), (b, DeadlineExceededError)]
    assert list(scheduler.waiting) == [c, d] and scheduler.waiting_images == 2
    assert plan.running == running and not plan.admitted


def test_deadline_drops_the_request_with_a_clear_error(engine):
    handle = engine.submit(GenerationRequest.of(0, seed=0, num_inference_steps=1000,
                                             deadline=time.time() + 0.2))
    with pytest.raises(DeadlineExceededError, match="deadline"):
        handle.result(timeout=30)
    assert engine.stats().running_requests == 0


def test_queue_is_bounded_and_its_depth_visible():
    eng = make_engine(max_batch_size=4, max_queue_size=3)  # not started: nothing leaves the queue
    eng.submit(GenerationRequest.of(0, n=2, seed=0))
    assert eng.stats().waiting_images == 2
    eng.submit(GenerationRequest.of(0, n=1, seed=0))
    with pytest.raises(QueueFullError, match="queue is full"):
        eng.submit(GenerationRequest.of(0, n=1, seed=0))


def test_fifo_admission_up_to_max_batch():
    steps = []
    eng = make_engine(max_batch_size=4)
    eng.on_step = steps.append
    first = eng.submit(GenerationRequest.of(0, n=2, seed=0, num_inference_steps=5))  # 4 rows
    second = eng.submit(GenerationRequest.of(0, n=1, seed=0, num_inference_steps=5))
    with eng:
        r1, r2 = first.result(timeout=30), second.result(timeout=30)
    assert max(s.rows for s in steps) == 4  # never more rows than the limit
    assert r2.queue_seconds > r1.queue_seconds  # the second waited for room


@pytest.mark.parametrize("field,build", [
    ("n", lambda: GenerationRequest.of(0, n=0)), ("n", lambda: GenerationRequest.of(0, n=99)),
    ("num_inference_steps", lambda: GenerationRequest.of(0, num_inference_steps=0)),
    ("sampler", lambda: GenerationRequest.of(0, sampler="euler")),
    ("guidance_scale", lambda: GenerationRequest.of(0, guidance_scale=float("nan"))),
    ("class_label", lambda: GenerationRequest.of(10)), ("seed", lambda: GenerationRequest.of(0, seed=-1)),
    ("eta", lambda: GenerationRequest.of(0, eta=2.0)), ("size", lambda: GenerationRequest.of(0, upscale=100)),
])
def test_invalid_requests_name_the_field(engine, field, build):
    """Refused with the API's field name and its range: when the request is built (the bounds every model has) or
    when it is submitted (this model's classes and this engine's limits)."""
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(build())
    assert info.value.field == field and field.split("_")[0] in str(info.value)


def test_request_level_batching_holds_new_requests_until_the_batch_is_done():
    """The load benchmark's request-level baseline (benchmarks/baselines.py) admits only into an emptied batch."""
    from benchmarks.baselines import use_policy

    steps = []
    eng = make_engine()
    use_policy(eng, "request")
    eng.on_step = steps.append
    with eng:
        a = eng.submit(GenerationRequest.of(0, seed=0, num_inference_steps=30, guidance_scale=1.0))
        while eng.stats().steps_done < 2:
            time.sleep(0.001)
        b = eng.submit(GenerationRequest.of(1, seed=1, num_inference_steps=3, guidance_scale=1.0))
        ra, rb = a.result(timeout=30), b.result(timeout=30)
    assert max(s.images for s in steps) == 1
    assert rb.queue_seconds >= ra.denoise_seconds * 0.5


def test_pixel_model_returns_uint8_images():
    with make_engine(space="pixel") as eng:
        result = eng.submit(GenerationRequest.of(0, n=2, seed=0, num_inference_steps=3)).result(30)
    assert result.images.dtype == np.uint8 and result.images.shape == (2, 8, 8, 4)


def test_failed_forward_fails_its_requests_and_the_engine_keeps_serving():
    eng = make_engine()
    real_execute, calls = eng.runner.execute, []

    def flaky(bucket, *args, **kwargs):
        calls.append(bucket)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        real_execute(bucket, *args, **kwargs)

    eng.runner.execute = flaky
    with eng:
        doomed = eng.submit(GenerationRequest.of(0, seed=0, num_inference_steps=5))
        with pytest.raises(Exception, match="generation failed: CUDA error"):
            doomed.result(timeout=30)
        later = eng.submit(GenerationRequest.of(1, seed=1, num_inference_steps=5)).result(timeout=30)
        eng.health()
    assert later.latents.shape == (1, 4, 8, 8)


def test_health_fails_when_the_loop_dies():
    eng = make_engine().start()
    eng.health()

    def boom(*args, **kwargs):
        raise SystemExit("simulated crash of the loop")

    eng.scheduler.schedule = boom
    handle = eng.submit(GenerationRequest.of(0, seed=0, num_inference_steps=3))
    with pytest.raises(Exception, match="loop died"):
        handle.result(timeout=10)
    with pytest.raises(Exception, match="loop died"):
        eng.health()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp8"])
@pytest.mark.parametrize("cache_rows", [None, 0])
def test_gpu_compiled_graphs_match_fp32_and_never_recompile(precision, cache_rows):
    """Half precision + torch.compile + CUDA graphs against fp32 eager on the same requests.

    Bound: relative L2 error of the final samples under 1% (fp16) / 3% (bf16) / 10% (fp8). One rounding of a
    unit value costs 2^-11 (fp16), 2^-8 (bf16) or 2^-4 (e4m3, with bf16 around the GEMMs); 20 sampler steps of a
    2-layer model accumulate a few hundred such roundings, with partial cancellation (a GEMM averages its inputs'
    roundings over K terms), so errors of 1e-3 (fp16), 1e-2 (bf16) and a few 1e-2 (fp8) are expected and anything
    near 1 would mean a wrong kernel. With a feature cache (``cache_rows`` None) the requests mix its presets: the
    step's three compiled parts against the same schedule in fp32.
    """
    from torch._dynamo.utils import counters

    presets = list(CACHE_POLICIES) if cache_rows is None else ["off"]

    def requests(eng):
        handles = [eng.submit(GenerationRequest.of(i, n=1 + i % 2, seed=i, num_inference_steps=20,
                                                   cache=presets[i % len(presets)])) for i in range(5)]
        return np.concatenate([h.result(timeout=300).latents for h in handles])

    def engine(config):
        model = random_model()
        info = CheckpointInfo(config=model.config, class_names=default_class_names(10), space="latent")
        return Engine(model, info, config).start()

    ref_engine = engine(EngineConfig(device="cuda", precision="fp32", max_batch_size=8))  # with a feature cache
    ref = requests(ref_engine)
    ref_engine.stop()
    fast_config = EngineConfig(device="cuda", precision=precision, max_batch_size=8, compile=True,
                               cuda_graphs=True, feature_cache_rows=cache_rows, fast_paths=every_size_in(precision))
    configure_compile(fast_config)
    fast_engine = engine(fast_config)
    compiled_after_warmup = sum(counters["stats"].values()), dict(counters["frames"])
    fast = requests(fast_engine)
    fast_engine.stop()
    runner = fast_engine.runner
    assert set(runner._graphs) == {(part, b) for part, buckets in runner.parts.items() for b in buckets}
    assert (sum(counters["stats"].values()), dict(counters["frames"])) == compiled_after_warmup, \
        "torch.compile recompiled after warm-up"
    rel = float(np.linalg.norm(fast - ref) / np.linalg.norm(ref))
    print(f"{precision}: relative error vs fp32 {rel:.2e}")
    assert rel < {"fp16": 1e-2, "bf16": 3e-2, "fp8": 1e-1}[precision], rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("setup", ["fp16", "fp8", "fp8-blocks"])
def test_gpu_restart_loads_every_program_with_the_feature_cache(setup, tmp_path):
    """The served GPU setup (compiled, CUDA graphs, the default feature cache) restarted on its compile_cache_dir:
    every program loads, the symbolic-row parts of a cached step and fp8's custom ops included (``fp8-blocks``: a
    model 128 wide, so its MLPs take the block-scaled path and its Triton GEMM), none is compiled or traced, and the
    samples are bit for bit the first engine's (the same programs on the same inputs)."""
    from torch._dynamo.utils import counters

    from dit_runtime.engine.fp8 import Fp8BlockMlp

    precision = setup.removesuffix("-blocks")
    config = EngineConfig(device="cuda", precision=precision, max_batch_size=8, compile=True, cuda_graphs=True,
                          compile_cache_dir=str(tmp_path), fast_paths=every_size_in(precision))
    configure_compile(config, engines=2)

    def model() -> DiTModel:
        if setup != "fp8-blocks":
            return random_model()
        torch.manual_seed(0)
        wide = DiTModel.from_config(dataclasses.replace(get_preset("dit-tiny"), hidden_dim=128, ffn_dim=512))
        for p in wide.parameters():
            torch.nn.init.normal_(p, std=0.05)
        wide.reset_pos_embed()
        return wide.eval()

    info = CheckpointInfo(config=model().config, class_names=default_class_names(10), space="latent")
    presets = list(CACHE_POLICIES)

    def run():
        with Engine(model(), info, config) as eng:
            blocks = any(isinstance(m, Fp8BlockMlp) for m in eng.runner.model.modules())
            assert blocks == (setup == "fp8-blocks"), "the MLPs did not take the path the setup names"
            handles = [eng.submit(GenerationRequest.of(i, n=1 + i % 2, seed=i, num_inference_steps=20,
                                                       cache=presets[i % len(presets)]))
                       for i in range(5)]
            return eng.runner.store, np.concatenate([h.result(timeout=300).latents for h in handles])

    first, want = run()
    assert first.loaded == 0 and first.compiled > 0
    assert not list(first.directory.glob("*.jit")), "a program fell back to torch.compile"
    traced = dict(counters["frames"])
    second, got = run()
    assert (second.loaded, second.compiled) == (first.compiled, 0)
    assert dict(counters["frames"]) == traced, "the restarted engine traced a function"
    np.testing.assert_array_equal(got, want)


def test_admission_writes_counter_noise_and_settings_and_compiles_only_at_warm_up():
    """Admission writes each admitted image's slot (initial noise, step count, guidance) through one program per
    bucket, its rows padded with rows that write the scratch slot: the noise is counter_noise's up to float
    rounding, the other slots are left alone, and after warm-up no admitted count compiles again."""
    from torch._dynamo.utils import counters

    config = EngineConfig(max_batch_size=8, batch_buckets=(1, 4, 8), compile=True, feature_cache_rows=0)
    configure_compile(config)
    runner = ModelRunner(random_model(), config, clip_denoised=False, num_train_timesteps=1000)
    runner.warm_up()
    compiled = sum(counters["stats"].values()), dict(counters["frames"])
    untouched = runner.x[7].clone()
    slot = 0
    for n in (1, 3, 2):  # buckets 1 and 4 (padded)
        request = GenerationRequest.of(1, n=n, seed=n, num_inference_steps=10 + n, guidance_scale=1.5 + n)
        state = RequestState(request=request, seed=n, submitted_at=0.0, slots=list(range(slot, slot + n)))
        with torch.no_grad():  # as the engine's step (the programs' guards check the grad mode)
            runner.admit([state])
        keys = torch.tensor([noise_key(n, i) for i in range(n)])
        want = counter_noise(keys, torch.full((n,), INITIAL_NOISE_COUNTER), runner.image_shape)
        torch.testing.assert_close(runner.x[state.slots], want, rtol=1e-5, atol=1e-5)
        assert runner.num_steps[state.slots].tolist() == [10 + n] * n
        assert runner.guidance[state.slots].tolist() == [1.5 + n] * n
        assert runner.step_index[state.slots].tolist() == [0] * n
        slot += n
    assert torch.equal(runner.x[7], untouched), "padding wrote a slot other than the scratch slot"
    assert (sum(counters["stats"].values()), dict(counters["frames"])) == compiled, "recompiled for a new count"


@torch.no_grad()
def test_a_step_that_admits_uploads_its_inputs_in_one_copy_and_each_part_leaves_the_other_alone():
    """Admission's settings (integers, and eta and guidance as float32 pairs in int64 elements) and the layout share
    one device buffer: a step that admits and lays out uploads it once, and what the programs read through their
    views is what the host wrote; admission alone leaves the device's layout as it was, a new layout alone the
    admission's rows."""
    config = EngineConfig(max_batch_size=4, batch_buckets=(1, 4), compile=False, warmup=False, feature_cache_rows=0)
    runner = ModelRunner(random_model(), config, clip_denoised=False, num_train_timesteps=1000)
    staging = runner._staging["step_inputs"]
    uploads = []
    upload = staging.upload
    staging.upload = lambda *args: (uploads.append(args), upload(*args))
    request = GenerationRequest.of(2, n=2, seed=5, num_inference_steps=7, guidance_scale=2.5, eta=0.25)
    state = RequestState(request=request, seed=5, submitted_at=0.0, slots=[1, 2])
    layout = Layout(bucket=4, rows=4, images=2, image_slot=[1, 2, 4, 4], row_image=[0, 1, 0, 1],
                    row_label=[2, 2, 10, 10], cond_row=[0, 1, 0, 0], uncond_row=[2, 3, 0, 0], row_cache=[0] * 4)
    runner.execute(4, admitted=[state], layout=layout)
    assert len(uploads) == 1
    assert runner.admit_ints[:2, AdmitColumn.SLOT].tolist() == [1, 2]
    assert runner.admit_ints[:2, AdmitColumn.STEPS].tolist() == [7, 7]
    assert runner.admit_floats[:2].tolist() == [[0.25, 2.5], [0.25, 2.5]]
    assert runner.layout[ROW_LABEL].tolist() == [2, 2, 10, 10] and runner.layout[ROW_REAL].tolist() == [1] * 4
    assert runner.num_steps[[1, 2]].tolist() == [7, 7] and runner.guidance[[1, 2]].tolist() == [2.5, 2.5]
    before = runner.layout.clone()
    runner.admit([RequestState(request=GenerationRequest.of(3, seed=6, num_inference_steps=9), seed=6,
                               submitted_at=0.0, slots=[3])])
    assert torch.equal(runner.layout, before) and runner.num_steps[3].item() == 9
    admission = runner.admit_ints.clone()
    runner.execute(1, layout=Layout(bucket=1, rows=1, images=1, image_slot=[3], row_image=[0], row_label=[3],
                                    cond_row=[0], uncond_row=[0], row_cache=[0]))
    assert torch.equal(runner.admit_ints, admission) and runner.layout[IMAGE_SLOT, :2].tolist() == [3, 0]
    layout_start = runner.admit_floats.numel() // 2 + runner.admit_ints.numel()  # floats: two to an element
    assert uploads == [(0, None), (0, layout_start), (layout_start, None)]  # all; the admission's part; the layout's


def test_a_restart_loads_its_compiled_programs_and_traces_nothing(tmp_path):
    """With a compile_cache_dir an engine saves each compiled program whole (engine/programs.py). A second engine on
    the same directory, over other weights of the same shapes, loads every one, compiles none, never enters Dynamo,
    and samples its own model: the weights are the programs' inputs, not constants baked into them. An engine with
    other buckets keeps its programs in a directory of its own."""
    from torch._dynamo.utils import counters

    config = EngineConfig(max_batch_size=2, batch_buckets=(2,), compile=True, feature_cache_rows=0,
                          compile_cache_dir=str(tmp_path))
    configure_compile(config, engines=2)
    request = GenerationRequest.of(3, n=1, seed=5, num_inference_steps=4)
    info = CheckpointInfo(config=random_model().config, class_names=default_class_names(10), space="latent")

    def latents(model, config):
        with Engine(model, info, config) as engine:
            return engine.runner, engine.submit(request).result(timeout=600).latents

    first, first_latents = latents(random_model(seed=0), config)
    programs = 2  # the step and the admission, at bucket 2
    assert (first.store.loaded, first.store.compiled) == (0, programs)
    traced = dict(counters["frames"])
    second, got = latents(random_model(seed=1), config)
    assert (second.store.loaded, second.store.compiled) == (programs, 0)
    assert dict(counters["frames"]) == traced, "the restarted engine traced a function"
    _, want = latents(random_model(seed=1), dataclasses.replace(config, compile=False))
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < model_reordering_tolerance(get_preset("dit-tiny"), steps=4), rel
    assert np.linalg.norm(got - first_latents) / np.linalg.norm(want) > 0.1  # the two models differ that much
    other = ModelRunner(random_model(), dataclasses.replace(config, max_batch_size=4, batch_buckets=(4,)),
                        clip_denoised=False, num_train_timesteps=1000)
    assert other.store.directory != second.store.directory


def test_a_program_that_cannot_be_saved_is_traced_at_each_start_and_says_why(tmp_path, caplog):
    """A function torch cannot compile ahead of time (here one with no ``aot_compile``) is marked with the reason, and
    each later start runs it as it is and logs a warning naming the marker to delete for another try."""
    from dit_runtime.engine.programs import ProgramStore

    def step(owner, x):
        return x + 1

    first = ProgramStore(tmp_path, {"model": "m"})
    assert first.program("step", "2", step, object(), torch.zeros(2)) is step
    (marker,) = first.directory.glob("*.jit")
    assert marker.name == "step-2.jit" and "cannot be compiled ahead of time" in marker.read_text()
    assert (first.loaded, first.compiled) == (0, 0)
    again = ProgramStore(tmp_path, {"model": "m"})
    with caplog.at_level("WARNING", logger="dit_runtime.engine.programs"):
        assert again.program("step", "2", step, object(), torch.zeros(2)) is step
    assert f"delete {marker}" in caplog.text and "cannot be compiled ahead of time" in caplog.text


def test_compile_cache_dir_is_used_even_after_inductor_chose_its_default(tmp_path, monkeypatch):
    """Importing torch._dynamo.utils makes inductor write its default cache dir into the environment; an engine's
    compile_cache_dir must still be where its compiled graphs go (else a restart compiles everything again) once the
    entry point configured the process for it. Building the engine alone leaves the process's settings as they
    were: they belong to the entry point, not to the library."""
    import torch._dynamo.utils  # noqa: F401
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", cache_dir())  # what inductor has set by now, restored afterwards
    default = cache_dir()
    target = tmp_path / "compile-cache"
    config = EngineConfig(max_batch_size=16, compile=True, compile_cache_dir=str(target))
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    limit = getattr(torch._dynamo.config, name)
    ModelRunner(random_model(), config, clip_denoised=False, num_train_timesteps=1000)
    assert cache_dir() == default and getattr(torch._dynamo.config, name) == limit
    configure_compile(config)
    ModelRunner(random_model(), config, clip_denoised=False, num_train_timesteps=1000)
    assert cache_dir() == str(target) and target.is_dir()

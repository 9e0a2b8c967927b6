"""Feature caching inside step-level batching: per image row, the blocks run or are forecast, alone or in a crowd."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dit_runtime.checkpoint import CheckpointInfo, default_class_names
from dit_runtime.engine import (DeadlineExceededError, Engine, EngineConfig, GenerationRequest, InvalidRequestError,
                                RequestCancelledError, SamplingParams)
from dit_runtime.engine.feature_cache import FeatureCache
from dit_runtime.engine.process_settings import configure_compile
from dit_runtime.engine.runner import ModelRunner, free_memory, is_full_step_on_device
from dit_runtime.model import DiTConfig, DiTModel, get_preset
from dit_runtime.request import CACHE_POLICIES, CachePolicy
from model_helpers import assert_close_across_shapes, model_reordering_tolerance
from test_engine import make_engine, random_model

CACHING = [name for name, policy in CACHE_POLICIES.items() if policy.caches]


def test_host_and_device_apply_the_same_schedule_rule():
    """The scheduler sizes the forward from the rule on ints; the runner picks rows with it on tensors."""
    for policy in CACHE_POLICIES.values():
        for num_steps in range(1, 61):
            steps = torch.arange(num_steps)
            schedule = [torch.full((num_steps,), v) for v in policy.schedule(num_steps)]
            on_device = is_full_step_on_device(steps, *schedule).tolist()
            on_host = [policy.is_full_step(i, num_steps) for i in range(num_steps)]
            assert on_device == on_host
            assert on_host[0], "step 0 must run the blocks: it writes the cache before anything reads it"
            assert on_host[-1] or policy.final_full_steps == 0
            assert all(on_host[:policy.order + 1]), "a forecast of order k needs k + 1 full steps behind it"
            if not policy.caches:
                assert all(on_host)


def test_the_compiled_embed_part_picks_the_rows_the_host_rule_picks_on_the_cpu():
    """The feature-cached step's first part compiled for the CPU, at a bucket of 2 rows in buffers of 4: at every
    step each row runs the blocks where the host's rule says, two presets side by side. With the rule in integers
    this compile threw inductor's ZeroDivisionError at the first call (``is_full_step_on_device`` says why)."""
    config = EngineConfig(max_batch_size=4, batch_buckets=(2, 4), compile=True, warmup=False)
    configure_compile(config)
    runner = ModelRunner(random_model(), config, clip_denoised=False, num_train_timesteps=1000)
    num_steps, presets = 20, [CACHE_POLICIES["fast"], CACHE_POLICIES["balanced"]]
    # Two images of one row each: slots 0 and 1, classes 3 and 5, cache entries 0 and 1, both rows real.
    runner.layout[:, :2] = torch.tensor([[0, 1], [0, 1], [3, 5], [0, 1], [0, 1], [0, 1], [1, 1]])
    runner.num_steps[:2] = num_steps
    for slot, policy in enumerate(presets):
        runner.cache_interval[slot], runner.cache_warmup[slot], runner.cache_cooldown[slot] = \
            policy.schedule(num_steps)
    for step in range(num_steps):
        runner.step_index[:2] = step
        runner._fns["embed"](2)
        assert runner.row_full[:2].tolist() == [p.is_full_step(step, num_steps) for p in presets], step


def test_presets_skip_the_blocks_at_a_growing_share_of_steps():
    full = [CACHE_POLICIES[name].full_steps(50) for name in ("off", "balanced", "fast")]
    assert full[0] == 50 and full[0] > full[1] > full[2]


def test_forecast_is_exact_for_a_residual_linear_in_the_step():
    cache = FeatureCache(rows=2, tokens=3, hidden_dim=4, dtype=torch.float64, device=torch.device("cpu"))
    cache.terms.fill_(float("nan"))  # whatever an earlier request left
    a, b = torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)
    entry = torch.tensor([1])
    for step in (0, 2):
        cache.update(entry, a + b * step, torch.tensor([step]))
    step5 = torch.tensor([5])
    torch.testing.assert_close(cache.forecast(entry, step5, torch.tensor([1])), a + 5 * b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.forecast(entry, step5, torch.tensor([0])), a + 2 * b, rtol=0, atol=0)


def test_first_update_ignores_what_the_entry_held_before():
    cache = FeatureCache(rows=1, tokens=2, hidden_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    cache.terms.fill_(float("nan"))
    cache.last_full.fill_(7)
    residual = torch.ones(1, 2, 2)
    cache.update(torch.tensor([0]), residual, torch.tensor([0]))
    assert torch.equal(cache.forecast(torch.tensor([0]), torch.tensor([3]), torch.tensor([1])), residual)


@pytest.mark.numerics
def test_off_requests_are_unchanged_by_the_feature_cache():
    """With a feature cache the step runs as three functions (the blocks' adaLN a GEMM of its own, the final layer's
    another) instead of one: the same operations on other shapes, so equal up to the reordering bound."""
    request = GenerationRequest.of(4, n=2, seed=3, num_inference_steps=7, guidance_scale=3.0)
    plain = make_engine(feature_cache_rows=0).generate([request])[0].latents
    with_cache = make_engine()
    assert with_cache.runner.cache is not None
    bound = model_reordering_tolerance(get_preset("dit-tiny"), steps=request.sampling.num_inference_steps)
    assert_close_across_shapes(torch.from_numpy(with_cache.generate([request])[0].latents), torch.from_numpy(plain),
                               bound)


@pytest.mark.numerics
@pytest.mark.parametrize("cache", CACHING)
def test_cached_request_is_the_same_alone_and_in_a_busy_mixed_batch(cache):
    """Exact, for the reason test_engine's independence test gives (one bucket of 16 rows): neighbours at other
    steps, with other presets or none, change which rows run the blocks but not any request's numbers."""
    probe = GenerationRequest.of(3, n=2, seed=1234, num_inference_steps=12, guidance_scale=4.0, cache=cache)
    # Neighbours with other step counts finish early and let later ones in, so rows join at other steps; the first
    # caches, so its rows sit where the packed forward's padding points.
    presets = [cache, "off", *CACHE_POLICIES]
    crowd = [GenerationRequest.of(i % 10, n=1 + i % 2, seed=i, num_inference_steps=5 + 3 * i,
                                  sampler=("ddpm", "ddim", "dpm-solver++")[i % 3], guidance_scale=(1.0, 2.5)[i % 2],
                                  cache=presets[i % len(presets)]) for i in range(6)]
    requests = crowd[:4] + [probe] + crowd[4:]
    steps = []
    engine = make_engine()
    engine.on_step = steps.append
    together = engine.generate(requests)
    for request, result in zip(requests, together):
        alone = make_engine().generate([request])[0].latents
        assert np.array_equal(result.latents, alone), request
    assert len({s.compute_rows for s in steps}) > 2, "the crowd should change which rows run the blocks"
    off = make_engine().generate([GenerationRequest.of(3, n=2, seed=1234, num_inference_steps=12,
                                                       guidance_scale=4.0)])[0].latents
    assert not np.array_equal(together[4].latents, off)  # the cache changed something: the equality could fail


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_rows_that_forecast_skip_the_blocks_as_the_schedule_says(sampler):
    steps = []
    engine = make_engine(max_batch_size=64)
    engine.on_step = steps.append
    num_steps = 20
    policy = CACHE_POLICIES["fast"]
    cached = GenerationRequest.of(1, n=8, seed=0, num_inference_steps=num_steps, sampler=sampler, cache="fast")
    off = GenerationRequest.of(2, n=1, seed=0, num_inference_steps=num_steps, sampler=sampler, guidance_scale=1.0)
    results = engine.generate([cached, off])
    assert all(np.isfinite(r.latents).all() for r in results)
    computed = {name: sum(c for s in steps for n, c, _ in s.rows_by_cache if n == name) for name in ("fast", "off")}
    skipped = sum(k for s in steps for n, _, k in s.rows_by_cache if n == "fast")
    assert computed == {"fast": policy.full_steps(num_steps) * cached.rows, "off": num_steps * off.rows}
    assert skipped == (num_steps - policy.full_steps(num_steps)) * cached.rows
    # At a forecast step only the off request's row runs the blocks, in the smallest bucket, not the batch's.
    forecast_steps = [s for s in steps if s.compute_rows == off.rows]
    assert forecast_steps and all(s.compute_bucket == 16 < s.bucket == 32 for s in forecast_steps)


@pytest.mark.numerics
def test_no_request_reads_the_cache_another_left_behind():
    def probe():
        return GenerationRequest.of(5, n=2, seed=9, num_inference_steps=10, cache="balanced")

    fresh = make_engine().generate([probe()])[0].latents
    engine = make_engine()
    engine.generate([GenerationRequest.of(7, n=4, seed=1, num_inference_steps=9, cache="fast")])
    engine.runner.cache.terms.fill_(float("nan"))  # the pool as the last request left it, made poisonous
    engine.runner.cache.last_full.fill_(3)
    assert np.array_equal(engine.generate([probe()])[0].latents, fresh)


def test_a_request_gives_its_cache_rows_back_when_it_ends_in_any_way():
    engine = make_engine().start()
    pool = engine.config.cache_rows
    try:
        engine.submit(GenerationRequest.of(1, n=2, seed=0, num_inference_steps=5, cache="balanced")).result(30)
        assert engine.scheduler.free_cache_rows == pool
        handle = engine.submit(GenerationRequest.of(1, n=2, seed=0, num_inference_steps=1000, cache="fast"))
        while engine.scheduler.free_cache_rows == pool:
            time.sleep(0.001)
        assert engine.scheduler.free_cache_rows == pool - 4  # two guided images: four rows
        handle.cancel()
        with pytest.raises(RequestCancelledError):
            handle.result(30)
        assert engine.scheduler.free_cache_rows == pool
        late = GenerationRequest.of(1, n=1, seed=0, num_inference_steps=1000, cache="fast",
                                    deadline=time.time() + 0.2)
        with pytest.raises(DeadlineExceededError):
            engine.submit(late).result(30)
        assert engine.scheduler.free_cache_rows == pool
    finally:
        engine.stop()


def test_a_caching_request_waits_for_cache_rows_and_one_that_never_fits_is_refused():
    engine = make_engine(feature_cache_rows=4)
    first = GenerationRequest.of(1, n=2, seed=0, num_inference_steps=6, cache="balanced")  # 4 rows: the pool
    second = GenerationRequest.of(2, n=2, seed=0, num_inference_steps=6, cache="balanced")
    a, b = engine.generate([first, second])
    assert b.queue_seconds >= a.denoise_seconds * 0.9  # admitted only once the first gave its rows back
    with pytest.raises(InvalidRequestError) as e:
        engine.submit(GenerationRequest.of(1, n=3, seed=0, cache="balanced"))
    assert e.value.field == "cache" and "holds 4" in str(e.value)


def test_cache_errors_name_the_field_and_the_choices():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(cache="turbo")
    assert e.value.field == "cache" and "off, balanced, fast" in str(e.value)
    engine = make_engine(feature_cache_rows=0)
    assert engine.spec.cache_policies == ("off",) and engine.runner.cache is None
    with pytest.raises(InvalidRequestError) as e:
        engine.submit(GenerationRequest.of(1, cache="balanced"))
    assert e.value.field == "cache" and "feature_cache_rows: 0" in str(e.value)
    with pytest.raises(ValueError, match="default_cache balanced needs a feature cache"):
        EngineConfig(feature_cache_rows=0, default_cache="balanced")
    with pytest.raises(ValueError, match="order must be"):
        CachePolicy(interval=2, order=5)


def test_the_default_preset_comes_from_the_config():
    engine = make_engine(default_cache="fast")
    assert engine.spec.defaults.cache == "fast"
    assert engine.spec.sampling().cache == "fast" and engine.spec.sampling(cache="off").cache == "off"


def test_the_pool_holds_what_dit_verify_reports_per_row():
    engine = make_engine()
    cache, cfg = engine.runner.cache, engine.runner.model.config
    held = cache.terms.numel() * cache.terms.element_size() + cache.last_full.numel() * 8
    per_row = FeatureCache.bytes_per_row(cfg.num_tokens, cfg.hidden_dim, torch.float32)
    assert held == (engine.config.cache_rows + 1) * per_row  # the pool and its scratch entry


def test_engine_refuses_a_feature_cache_that_does_not_fit_in_memory():
    config = DiTConfig(hidden_dim=256, num_layers=1, num_heads=1, ffn_dim=4, input_size=512, patch_size=2,
                       in_channels=1, num_classes=2, learn_sigma=False)
    per_row = FeatureCache.bytes_per_row(config.num_tokens, config.hidden_dim, torch.float32)
    rows = free_memory(torch.device("cpu")) // per_row + 1  # the cache alone is more than the host has free
    model = DiTModel.from_config(config)
    info = CheckpointInfo(config=config, class_names=default_class_names(2), space="pixel")
    with pytest.raises(ValueError, match=r"feature_cache_rows \d+ needs .* GiB .* MiB per cached row"):
        Engine(model, info, EngineConfig(max_batch_size=rows, feature_cache_rows=rows, warmup=False))

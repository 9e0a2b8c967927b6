"""Few-step students end to end on the CPU: a tiny teacher trained on a 100-step schedule, dit-distill, and the
student served by the engine at one row per image, refused what its contract does not allow."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dit_runtime.checkpoint import load_model, read_info, sha256_of
from dit_runtime.engine import Engine, EngineConfig, GenerationRequest, InvalidRequestError
from dit_runtime.train.cli import distill_main
from dit_runtime.train.config import load_config
from dit_runtime.train.trainer import Trainer
from model_helpers import reference_sample

REPO = Path(__file__).resolve().parents[1]
# A digit model that trains in seconds; a 100-step schedule, so a sampler on the paper's 1000 would be wrong.
TEACHER = [("model.hidden_dim", "32"), ("model.num_layers", "1"), ("model.num_heads", "2"), ("model.ffn_dim", "64"),
           ("diffusion.num_timesteps", "100"), ("diffusion.num_inference_steps", "10"),
           ("diffusion.sampler", "ddim"), ("trainer.per_device_train_batch_size", "16"),
           ("trainer.learning_rate", "1e-3"), ("trainer.max_steps", "20"), ("trainer.log_every", "5"),
           ("trainer.seed", "3")]
STUDENT = ["--distill.segments", "2", "--distill.teacher_steps", "10", "--distill.max_guidance_scale", "3",
           "--trainer.per_device_train_batch_size", "8", "--trainer.learning_rate", "1e-4", "--trainer.log_every", "1",
           "--checkpointing.save_every", "2", "--checkpointing.keep_last", "5", "--trainer.seed", "5"]
# One bucket of 16 rows: every forward has one shape, so results are equal bit for bit alone and in a batch.
ENGINE = EngineConfig(max_batch_size=16, batch_buckets=(16,))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    config = load_config(REPO / "train_config/digits-s.yaml", TEACHER + [("checkpointing.output_dir", str(out))])
    return Trainer(config, command=["dit-train"]).run()


def distil(teacher: Path, out: Path, steps: int, *extra: str) -> Path:
    code = distill_main([str(teacher), *STUDENT, "--trainer.max_steps", str(steps), "--checkpointing.output_dir",
                         str(out), *extra])
    assert code == 0
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> Path:
    return distil(teacher, tmp_path_factory.mktemp("student"), 6)


def test_a_model_trained_on_a_100_step_schedule_is_sampled_on_it(teacher):
    model, info = load_model(teacher)
    assert info.sampling.num_train_timesteps == 100
    request = GenerationRequest.of(4, n=2, seed=11, sampler="ddim", num_inference_steps=10, guidance_scale=2.0)
    latents = Engine(model, info, ENGINE).generate([request])[0].images
    want = reference_sample(model, request, num_train_timesteps=100, clip_denoised=True)
    on_1000 = reference_sample(model, request, num_train_timesteps=1000, clip_denoised=True)
    assert not np.allclose(want, on_1000, atol=1e-3)  # the schedule matters: the check below can fail
    images = np.clip(np.round((want + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(latents.astype(int) - images.astype(int)).max() <= 1  # rounding at the uint8 boundary


def test_the_student_records_its_contract_and_teacher(student, teacher):
    info = read_info(student)
    contract = info.sampling
    assert info.config.guidance_embed and contract.prediction == "consistency" and contract.guidance == "embedded"
    assert contract.num_train_timesteps == 100 and contract.samplers == ("consistency",)
    assert contract.defaults.num_inference_steps == 2 and contract.max_guidance_scale == 3.0
    assert contract.teacher.sha256 == sha256_of(teacher) and contract.teacher.segments == 2
    assert info.training["command"].startswith("dit-distill ")
    assert (student.parent / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_distillation_follows_the_uninterrupted_one_exactly(teacher, student, tmp_path):
    """Resume restores the target network too: stop at step 4, resume to 6, and every logged loss matches."""
    first = distil(teacher, tmp_path, 4)
    resumed = distil(teacher, tmp_path, 6, "--resume")
    log = lambda path: {r["step"]: r["loss"] for r in map(json.loads, (path.parent / "train_log.jsonl").open())}
    assert log(resumed) == log(student)
    assert first == resumed


def test_the_student_serves_one_row_per_guided_image_as_its_plain_loop_does(student):
    model, info = load_model(student)
    engine = Engine(model, info, ENGINE)
    request = GenerationRequest.of(7, n=3, seed=2, sampler="consistency", num_inference_steps=2, guidance_scale=2.5)
    assert request.rows == 3
    got = engine.generate([request])[0].images
    want = reference_sample(model, request, num_train_timesteps=100, clip_denoised=True)
    images = np.clip(np.round((want + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(got.astype(int) - images.astype(int)).max() <= 1
    # The guidance scale is an input, which distillation taught the student (its embedding started at zero).
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([99, 49]), torch.tensor([7, 7])
    with torch.no_grad():
        assert not torch.equal(model(x, t, y, torch.full((2,), 1.0)), model(x, t, y, torch.full((2,), 2.5)))


def test_a_student_request_is_the_same_alone_and_in_a_busy_batch(student):
    model, info = load_model(student)
    engine = Engine(model, info, ENGINE)
    probe = GenerationRequest.of(3, n=2, seed=9, sampler="consistency", num_inference_steps=4, guidance_scale=2.0)
    alone = engine.generate([probe])[0].images
    neighbours = [GenerationRequest.of(d, n=2, seed=d, sampler="consistency", num_inference_steps=steps,
                                       guidance_scale=1.0 + d / 4)
                  for d, steps in ((1, 1), (5, 8), (8, 2))]
    busy = engine.generate([neighbours[0], probe, *neighbours[1:]])[1].images
    assert np.array_equal(alone, busy)


def test_a_student_trained_for_several_step_counts_takes_the_count_as_an_input(teacher, tmp_path):
    student = distil(teacher, tmp_path, 4, "--distill.segment_counts", "[4, 1, 2]", "--distill.teacher_steps", "8")
    model, info = load_model(student)
    assert info.config.steps_embed and info.sampling.step_counts == (1, 2, 4)
    assert info.sampling.defaults.num_inference_steps == 2  # segments: the default, one of the counts
    engine = Engine(model, info, ENGINE)
    for steps in (1, 4):  # the engine hands each row its request's count, as the plain loop does
        request = GenerationRequest.of(5, n=2, seed=3, sampler="consistency", num_inference_steps=steps,
                                       guidance_scale=2.0)
        got = engine.generate([request])[0].images
        want = reference_sample(model, request, num_train_timesteps=100, clip_denoised=True)
        images = np.clip(np.round((want + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        assert np.abs(got.astype(int) - images.astype(int)).max() <= 1
    x, t, y, w = torch.randn(2, 1, 16, 16), torch.tensor([99, 49]), torch.tensor([7, 7]), torch.full((2,), 2.0)
    with torch.no_grad():  # distillation taught the count (its embedding started at zero)
        assert not torch.equal(model(x, t, y, w, torch.full((2,), 1)), model(x, t, y, w, torch.full((2,), 4)))
    with pytest.raises(InvalidRequestError) as e:  # 8 steps: not trained for
        engine.spec.build_request(prompt="3", num_inference_steps=8)
    assert e.value.field == "num_inference_steps"


# Runs under torchrun: distils through the public Distiller, then every rank writes its student and target weights.
DDP_WORKER = """
import sys, torch.distributed as dist
from safetensors.torch import save_file
from dit_runtime.train.config import DistillConfig, load_config, parse_overrides
from dit_runtime.train.distill import Distiller

teacher, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
config = load_config(None, parse_overrides(overrides) + [("checkpointing.output_dir", out)], DistillConfig)
distiller = Distiller(config, teacher, command=["dit-distill", "(ddp test)"])
distiller.run()
rank = distiller.dist.rank
for part in ("model", "target"):
    state = getattr(distiller, part).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/{part}-rank{rank}.safetensors")
sys.stdout.write(f"world {distiller.dist.world_size} global_batch {distiller.global_batch}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""


def test_two_process_gloo_distillation_keeps_student_and_target_equal_on_every_rank(teacher, tmp_path):
    """dit-distill under torchrun: the EMA target network is updated from the all-reduced student on each rank,
    so both ranks end with the same two networks, and the checkpoint records the run's two ranks."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    steps = 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(teacher), str(tmp_path), *STUDENT, "--trainer.max_steps", str(steps)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("world 2 global_batch 16") == 2
    for part in ("model", "target"):
        rank0, rank1 = (load_file(tmp_path / f"{part}-rank{r}.safetensors") for r in (0, 1))
        assert rank0.keys() == rank1.keys()
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), part
    model, target = (load_file(tmp_path / f"{part}-rank0.safetensors") for part in ("model", "target"))
    teacher_weights = load_file(teacher)
    # Training moved the guidance embedding's zero-initialised last layer, and the target followed part of the way.
    key = "g_embedder.mlp.2.weight"
    assert model[key].abs().sum() > 0 and target[key].abs().sum() > 0 and not torch.equal(model[key], target[key])
    assert not torch.equal(model["final_layer.linear.weight"], teacher_weights["final_layer.linear.weight"])
    info = read_info(tmp_path / "model.safetensors")
    assert info.sampling.prediction == "consistency" and info.sampling.teacher.sha256 == sha256_of(teacher)
    assert info.training["hardware"].startswith("2 x ") and info.training["samples_seen"] == steps * 16


@pytest.mark.parametrize("field,value", [("num_inference_steps", 3), ("sampler", "ddim"), ("guidance_scale", 3.5),
                                         ("cache", "balanced")])
def test_the_engine_refuses_what_the_students_contract_does_not_allow(student, field, value):
    engine = Engine.from_checkpoint(student, EngineConfig(max_batch_size=16, batch_buckets=(16,), warmup=False))
    spec = engine.spec
    assert spec.defaults.sampler == "consistency" and spec.max_guidance_scale == 3.0
    with pytest.raises(InvalidRequestError) as e:
        spec.build_request(prompt="3", **{field: value})
    assert e.value.field == field


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_student_matches_fp32_and_is_the_same_alone_and_in_a_batch():
    """A student in fp16, compiled and graph-captured, against fp32 eager (relative L2 under 1%, the bound of the
    teachers' GPU test), at 1-8 steps and several guidance scales; and a request's bits alone and in a busy batch
    (one bucket, so one program serves both)."""
    from dit_runtime.contract import SamplingContract, Teacher, student_contract
    from dit_runtime.engine import configure_compile
    from dit_runtime.model import DiTModel, get_preset
    from dit_runtime.checkpoint import CheckpointInfo, default_class_names
    from model_helpers import randomize

    contract = student_contract(SamplingContract(), Teacher(checkpoint="random", sha256="", segments=4,
                                                            method="multistep-consistency"),
                                max_guidance_scale=8.0, guidance_scale=4.0)
    config = dataclasses.replace(get_preset("dit-tiny"), guidance_embed=True)
    info = CheckpointInfo(config=config, class_names=default_class_names(10), space="latent", sampling=contract)

    def engine(engine_config):
        return Engine(randomize(DiTModel.from_config(config), std=0.05), info, engine_config).start()

    def requests(eng):
        handles = [eng.submit(GenerationRequest.of(i, n=1 + i % 2, seed=i, sampler="consistency",
                                                   num_inference_steps=(1, 2, 4, 8)[i % 4], guidance_scale=1.0 + i))
                   for i in range(6)]
        return np.concatenate([h.result(timeout=300).latents for h in handles])

    with engine(EngineConfig(device="cuda", precision="fp32", max_batch_size=8, feature_cache_rows=0)) as ref_engine:
        ref = requests(ref_engine)
    fast_config = EngineConfig(device="cuda", precision="fp16", max_batch_size=8, batch_buckets=(8,), compile=True,
                               cuda_graphs=True, feature_cache_rows=0)
    configure_compile(fast_config)
    with engine(fast_config) as fast_engine:
        fast = requests(fast_engine)
        def probe():
            return GenerationRequest.of(3, n=2, seed=77, sampler="consistency", num_inference_steps=4,
                                        guidance_scale=3.0)
        alone = fast_engine.submit(probe()).result(timeout=300).latents
        busy = [fast_engine.submit(GenerationRequest.of(5, n=2, seed=5, sampler="consistency", num_inference_steps=8,
                                                        guidance_scale=2.0)),
                fast_engine.submit(probe())]
        assert np.array_equal(busy[1].result(timeout=300).latents, alone)
        busy[0].result(timeout=300)
    rel = float(np.linalg.norm(fast - ref) / np.linalg.norm(ref))
    print(f"student fp16: relative error vs fp32 {rel:.2e}")
    assert rel < 1e-2, rel


def test_what_distillation_regresses_on_is_where_a_consistency_step_lands():
    """``x0_landing_on`` undoes ``ddim_to``, and the sampler's consistency step, given the output whose clean-image
    estimate is that x0, lands on the target: training and serving step between the same points the same way."""
    from dit_runtime.diffusion import SAMPLER_IDS, NoiseSchedule, _bcast, sampler_step, timestep_at
    from dit_runtime.train.distill import ddim_to, x0_landing_on

    gen = torch.Generator().manual_seed(0)
    schedule, segments = NoiseSchedule.linear(1000), 4
    step = torch.arange(segments)  # one sample at each segment's start
    steps = torch.full((segments,), segments)
    x_t, x_s = torch.randn(segments, 1, 4, 4, generator=gen), torch.randn(segments, 1, 4, 4, generator=gen)
    ab_t, ab_s = (_bcast(schedule.alpha_bar(timestep_at(i, steps)), x_t) for i in (step, step + 1))
    x0 = x0_landing_on(x_s, x_t, ab_t, ab_s)
    assert torch.allclose(ddim_to(x0, x_t, ab_t, ab_s), x_s, atol=1e-4)
    output = (torch.sqrt(ab_t) * x_t - x0) / torch.sqrt(1 - ab_t)  # consistency_x0(x_t, output) == x0
    landed = sampler_step(schedule, output, x_t, step, steps, torch.full((segments,), SAMPLER_IDS["consistency"]),
                          torch.zeros(segments), torch.zeros_like(x_t), torch.randn(x_t.shape, generator=gen),
                          learn_sigma=False).x
    assert torch.allclose(landed, x_s, atol=1e-3), (landed - x_s).abs().max()

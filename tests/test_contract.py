"""The sampling contract: the checkpoint's record of how its model is sampled, and what it refuses."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dit_runtime.checkpoint import CheckpointInfo, load_model, read_info, save_checkpoint
from dit_runtime.contract import STUDENT_STEP_COUNTS, SamplingContract, Teacher, student_contract
from dit_runtime.model import DiTModel, get_preset
from dit_runtime.request import InvalidRequestError, SamplingParams

STUDENT = student_contract(SamplingContract(num_train_timesteps=500),
                           Teacher(checkpoint="t.safetensors", sha256="ab" * 32, method="multistep-consistency",
                                   segments=4), max_guidance_scale=4.0, guidance_scale=2.5)


@pytest.mark.parametrize("contract", [SamplingContract(), STUDENT,
                                      SamplingContract(num_train_timesteps=100, guidance="none", max_guidance_scale=1.0,
                                                       defaults=SamplingParams(guidance_scale=1.0))])
def test_the_contract_round_trips_through_json(contract):
    assert SamplingContract.from_json(contract.to_json()) == contract


def test_a_checkpoint_records_its_contract_and_an_old_one_derives_it(tmp_path):
    config = get_preset("dit-tiny")
    model = DiTModel.from_config(config)
    names = [str(i) for i in range(config.num_classes)]
    recorded = SamplingContract(num_train_timesteps=250, defaults=SamplingParams(num_inference_steps=9))
    path = save_checkpoint(tmp_path / "new.safetensors", model.state_dict(),
                           CheckpointInfo(config=config, class_names=names, sampling=recorded))
    assert read_info(path).sampling == recorded
    # A file from before contracts: its training record says the schedule and the measured defaults.
    old = CheckpointInfo(config=config, class_names=names, training={
        "config": {"diffusion": {"num_timesteps": 300}},
        "default_sampling": {"sampler": "ddim", "num_inference_steps": 12, "guidance_scale": 3.0}})
    metadata = old.to_metadata()
    del metadata["sampling"]
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata=metadata)
    derived = load_model(tmp_path / "old.safetensors")[1].sampling
    assert derived.num_train_timesteps == 300 and derived.guidance == "null-row"
    assert derived.defaults == SamplingParams(sampler="ddim", num_inference_steps=12, guidance_scale=3.0)


def test_the_shipped_checkpoints_load_with_a_derived_contract():
    for name in ("digits-s", "digits-m"):
        contract = read_info(f"checkpoints/{name}.safetensors").sampling
        assert contract.num_train_timesteps == 1000 and contract.prediction == "epsilon"
        assert contract.defaults.sampler == "dpm-solver++" and contract.defaults.num_inference_steps == 25


@pytest.mark.parametrize("field,change", [
    ("num_inference_steps", dict(num_inference_steps=3)),
    ("sampler", dict(sampler="dpm-solver++")),
    ("guidance_scale", dict(guidance_scale=4.5)),
    ("cache", dict(cache="balanced")),
])
def test_a_student_refuses_what_its_contract_does_not_allow_naming_the_field(field, change):
    with pytest.raises(InvalidRequestError) as e:
        STUDENT.check(replace(STUDENT.defaults, **change))
    assert e.value.field == field
    STUDENT.check(replace(STUDENT.defaults, num_inference_steps=1, guidance_scale=4.0))  # the edges are allowed


def test_a_teacher_refuses_steps_past_its_schedule_and_the_student_sampler():
    contract = SamplingContract(num_train_timesteps=100)
    with pytest.raises(InvalidRequestError, match=r"\[1, 100\]") as e:
        contract.check(SamplingParams(num_inference_steps=101))
    assert e.value.field == "num_inference_steps"
    with pytest.raises(InvalidRequestError) as e:
        contract.check(SamplingParams(sampler="consistency"))
    assert e.value.field == "sampler"


def test_overrides_merge_over_the_recommended_defaults_and_are_checked():
    merged = STUDENT.with_overrides(num_inference_steps=2, cache=None)
    assert merged.defaults == replace(STUDENT.defaults, num_inference_steps=2)
    assert STUDENT.with_overrides() == STUDENT
    with pytest.raises(ValueError, match="num_inference_steps"):
        STUDENT.with_overrides(num_inference_steps=25)
    with pytest.raises(ValueError, match="cache"):
        STUDENT.with_overrides(cache="fast")


def test_a_student_image_is_one_row_whatever_its_guidance():
    assert STUDENT.defaults.guidance_scale == 2.5 and STUDENT.defaults.rows_per_image == 1
    assert SamplingParams(guidance_scale=2.5).rows_per_image == 2
    assert STUDENT.step_counts == STUDENT_STEP_COUNTS and STUDENT.max_inference_steps == 8

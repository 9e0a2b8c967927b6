"""The serving config: the shipped YAML files validate, and a bad config fails at start naming the field."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingConfig

from dit_runtime.request import GenerationRequest, RequestLimits
from serving.config import AppArgs, Limits
from serve_helpers import model_args, write_digits_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_digits_checkpoint(tmp_path_factory.mktemp("cfg") / "d.safetensors")


def app_args(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())["applications"][0]["args"]


def every_app_args(path: str) -> list[dict]:
    return [app["args"] for app in yaml.safe_load((ROOT / path).read_text())["applications"]]


def error_of(raw: dict) -> str:
    with pytest.raises(ValueError) as e:
        AppArgs.parse(raw)
    return str(e.value)


@pytest.mark.parametrize("config", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_shipped_configs_validate_once_their_checkpoints_exist(config, ckpt, tmp_path, monkeypatch):
    for raw in every_app_args(config):
        for m in raw["models"]:
            target = tmp_path / m["checkpoint"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ckpt, target)
            if "vae" in m:  # latent models name the VAE folder that decodes them
                (tmp_path / m["vae"]).mkdir(parents=True, exist_ok=True)
                (tmp_path / m["vae"] / "config.json").write_text("{}")
        monkeypatch.chdir(tmp_path)  # relative checkpoint paths resolve against the start directory
        args = AppArgs.parse(raw)
        assert [m.name for m in args.models] == [m["name"] for m in raw["models"]]
        for m in args.models:
            assert Path(m.checkpoint).is_absolute() and Path(m.checkpoint).is_file()
            # Ray's router must never hold fewer requests than fill the engine's batch.
            assert m.ongoing_requests_cap >= m.max_batch_size
            assert m.ray_autoscaling_config()["target_ongoing_requests"] <= m.ongoing_requests_cap
            # Ray Serve accepts the autoscaling config, and it scales on the engines' wait estimate.
            ray_config = AutoscalingConfig(**m.ray_autoscaling_config())
            assert ray_config.policy.policy_function == "serving.autoscaling:QueueWaitPolicy"
            assert ray_config.policy.policy_kwargs == {"target_queue_wait_s": m.max_queue_wait_s / 2}


def test_gpu_config_deploys_the_three_sizes_on_gpus_in_fp16_with_cuda_graphs():
    apps = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())["applications"]
    *model_apps, gateway = apps
    names = ["dit-10l", "dit-8l", "dit-6l"]
    # One application per model, named after it (the gateway finds it by that name), serving its own route.
    assert [a["name"] for a in model_apps] == names
    for app, name in zip(model_apps, names):
        assert app["import_path"] == "serving.app:build_model_app" and app["route_prefix"] == f"/models/{name}"
        [m] = app["args"]["models"]
        assert m["name"] == name and m["device"] == "cuda" and m["num_gpus"] > 0 and m["precision"] == "fp16"
        assert m["compile"] and m["cuda_graphs"] and m["checkpoint"] and not m.get("allow_random_weights")
    assert gateway["import_path"] == "serving.app:build_gateway_app" and gateway["route_prefix"] == "/"
    assert gateway["args"]["models"] == [a["args"]["models"][0] for a in model_apps]
    assert all(a["args"]["limits"] == gateway["args"]["limits"] for a in model_apps)
    assert sum(a["args"]["models"][0]["num_gpus"] for a in model_apps) <= 1.0  # the three fit one GPU


def test_model_app_builder_takes_exactly_one_model(ckpt):
    from serving.app import build_model_app
    with pytest.raises(ValueError, match=r"models: build_model_app serves exactly one model, got 2 \(a, b\)"):
        build_model_app({"models": [model_args("a", ckpt), model_args("b", ckpt)]})


def test_cpu_config_fits_two_cores_at_max_replicas(monkeypatch):
    monkeypatch.chdir(ROOT)  # its checkpoints, as `serve run` finds them
    args = AppArgs.parse(app_args("serve_config.yaml"))  # with every default a model leaves out
    total = args.gateway.num_cpus * args.gateway.num_replicas + \
        sum(m.num_cpus * m.autoscaling.max_replicas for m in args.models)
    assert total <= 2.0


def test_missing_checkpoint_names_the_field_and_the_file(tmp_path):
    msg = error_of({"models": [model_args("a", tmp_path / "nope.safetensors")]})
    assert "models[0]" in msg and "nope.safetensors" in msg and "not found" in msg


def test_random_weights_need_the_explicit_flag():
    msg = error_of({"models": [{"name": "dit-10l", "preset": "dit-10l"}]})
    assert "models[0]" in msg and "allow_random_weights" in msg
    args = AppArgs.parse({"models": [{"name": "dit-10l", "preset": "dit-10l", "allow_random_weights": True}]})
    assert args.models[0].checkpoint is None


@pytest.mark.parametrize("change, field", [
    ({"max_batch_size": 0}, "models[0].max_batch_size"),
    ({"precision": "float8"}, "models[0].precision"),
    ({"cuda_graphs": True}, "cuda_graphs needs device 'cuda'"),
    ({"decoder_cuda_graphs": True}, "decoder_cuda_graphs needs compile_decoder and device 'cuda'"),
    ({"decoder_compile_options": {"max_autotune": True}}, "decoder_compile_options needs compile_decoder"),
    ({"compile_options": {"max_autotun": True}}, "compile_options has options inductor does not know: max_autotun"),
    ({"precision": "fp16"}, "precision fp16 is for an NVIDIA GPU"),
    ({"precision": "fp8"}, "precision fp8 is for an NVIDIA GPU; use fp32 on cpu"),
    ({"dtype": "float16"}, "`dtype` is now `precision`"),
    ({"device": "cuda"}, "num_gpus > 0"),
    ({"name": "bad/name"}, "models[0].name"),
    ({"max_ongoing_requests": 2}, "would keep the engine's batch from filling"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "models[0].autoscaling"),
    ({"max_batch_sise": 8}, "models[0].max_batch_sise"),  # a typo is an error, not a silent default
    ({"encode_threads": 0}, "models[0].encode_threads"),
])
def test_bad_model_field_is_named(ckpt, change, field):
    assert field in error_of({"models": [model_args("a", ckpt, **change)]})


def test_limits_defaults_and_ranges_are_request_limits_own():
    """RequestLimits declares the engine's limit keys; the config edge reads them instead of declaring them again."""
    assert Limits().request_limits() == RequestLimits()  # the same defaults, the engine's
    assert set(RequestLimits.RANGES) == {f.name for f in dataclasses.fields(RequestLimits)} <= set(Limits.model_fields)
    for name, (low, high) in RequestLimits.RANGES.items():
        below = low - 1 if isinstance(low, int) else low / 2
        for bad in (below,) + ((high + 1,) if high is not None else ()):
            with pytest.raises(ValueError, match=rf"^{name} must be .* got {bad!r}$") as engine:
                RequestLimits(**{name: bad})
            with pytest.raises(ValueError) as edge:
                AppArgs.parse({"models": [{"name": "a", "preset": "dit-tiny", "allow_random_weights": True}],
                               "limits": {name: bad}})
            assert f"  limits.{name}: {engine.value}" in str(edge.value).splitlines()  # the engine's own message


@pytest.mark.parametrize("max_batch_size", [2, 7, 32, 33])
@pytest.mark.parametrize("model", ["teacher", "student", "random student"])
def test_guided_images_per_batch_is_as_many_guided_requests_as_one_batch_runs(ckpt, model, max_batch_size):
    """What the config sizes by requests in flight (max_ongoing_requests' floor, Ray's target_ongoing_requests)
    counts the guided one-image requests whose rows (the engine's rule) fill one batch, and no more: two rows each
    for a teacher, one for a student (its contract, read from the checkpoint's header)."""
    weights = {"teacher": {"checkpoint": str(ckpt)},
               "student": {"checkpoint": str(ROOT / "checkpoints" / "digits-s-4step.safetensors")},
               "random student": {"checkpoint": None, "preset": "dit-tiny", "allow_random_weights": True,
                                  "random_weights_as": "student"}}[model]
    m = AppArgs.parse({"models": [model_args("a", ckpt, max_batch_size=max_batch_size) | weights]}).models[0]
    k = m.guided_images_per_batch
    guided = GenerationRequest.of(0, guidance_scale=2.0, sampler="ddim" if model == "teacher" else "consistency",
                                  num_inference_steps=4)
    assert guided.rows == (2 if model == "teacher" else 1)
    assert k * guided.rows <= max_batch_size < (k + 1) * guided.rows
    assert m.ray_autoscaling_config()["target_ongoing_requests"] == k
    too_few = (model_args("a", ckpt, max_batch_size=max_batch_size, max_ongoing_requests=k - 1) | weights
               if k > 1 else None)
    assert too_few is None or "would keep the engine's batch from filling" in error_of({"models": [too_few]})


def test_bad_limits_and_duplicates_are_named(ckpt):
    assert "limits.max_images_per_request" in error_of(
        {"models": [model_args("a", ckpt)], "limits": {"max_images_per_request": 0}})
    assert "default_inference_steps" in error_of(
        {"models": [model_args("a", ckpt)], "limits": {"max_inference_steps": 10, "default_inference_steps": 25}})
    assert "repeated: a" in error_of({"models": [model_args("a", ckpt), model_args("a", ckpt)]})
    assert "models" in error_of({"models": []})


def test_a_student_beside_teachers_takes_its_own_default_steps_and_a_misfit_is_told_at_validation(ckpt):
    """An app-wide default of 25 steps suits a teacher, not a 4-step student: the config names the field to set, and
    a model's own default_inference_steps is the one its engine uses."""
    student = ROOT / "checkpoints" / "digits-s-4step.safetensors"
    limits = {"max_inference_steps": 100, "default_inference_steps": 25}
    message = error_of({"models": [model_args("t", ckpt), model_args("s", student)], "limits": limits})
    assert "limits.default_inference_steps: default_inference_steps 25 does not fit model 's' (a student of 1, 2, " \
           "4, 8 steps): set the model's own `default_inference_steps`" in message, message
    args = AppArgs.parse({"models": [model_args("t", ckpt), model_args("s", student, default_inference_steps=2)],
                          "limits": limits})
    teacher, student_args = args.models
    assert teacher.engine_config(args.limits).default_inference_steps == 25
    assert student_args.engine_config(args.limits).default_inference_steps == 2
    assert "models[0]: default_inference_steps 3 does not fit model 's'" in error_of(
        {"models": [model_args("s", student, default_inference_steps=3)]})
    assert "models[0].default_inference_steps (120) must be <=" in error_of(
        {"models": [model_args("t", ckpt, default_inference_steps=120)], "limits": limits})


def test_app_builder_refuses_a_bad_config_naming_the_field():
    """build_app (serve_config.yaml's import_path) validates its args before binding any deployment."""
    from serving.app import build_app
    raw = app_args("serve_config.yaml")
    raw["limits"]["max_inference_steps"] = -1
    with pytest.raises(ValueError, match=r"limits\.max_inference_steps: max_inference_steps must be an integer in "
                                         r"\[1, 1000\], got -1$"):
        build_app(raw)


def test_only_safetensors_checkpoints_are_accepted(tmp_path):
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"not opened")
    msg = error_of({"models": [model_args("a", pickle)]})
    assert "models[0]" in msg and "model.pt" in msg and "only safetensors" in msg and "dit-convert" in msg


def test_api_key_file_must_exist(ckpt, tmp_path):
    msg = error_of({"models": [model_args("a", ckpt)], "auth": {"api_keys_file": str(tmp_path / "keys.txt")}})
    assert "auth.api_keys_file" in msg and "keys.txt" in msg


@pytest.mark.parametrize("config", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_shipped_configs_bind_loopback_and_verify_checksums(config):
    raw = yaml.safe_load((ROOT / config).read_text())
    assert raw["http_options"]["host"] == "127.0.0.1"
    args = raw["applications"][0]["args"]
    assert all(m.get("verify_manifest", True) for m in args["models"])


def test_compile_settings_reach_the_engine_with_static_shapes_by_default(ckpt):
    """The issue's static shapes (one compiled program per bucket) unless a model asks for a symbolic batch size;
    compiled programs saved across starts unless a model turns it off."""
    default, dynamic = AppArgs.parse({"models": [
        model_args("a", ckpt), model_args("b", ckpt, compile_dynamic=True, compile_options={"max_autotune": True},
                                          compile_programs=False, compile_decoder=True,
                                          decoder_compile_options={"coordinate-descent-tuning": True})]}
    ).models
    assert default.engine_config().compile_dynamic is False and default.engine_config().compile_programs is True
    assert default.engine_config().decoder_compile_options is None
    config = dynamic.engine_config()
    assert config.compile_dynamic is True and config.compile_options == {"max_autotune": True}
    assert config.compile_programs is False
    assert config.decoder_compile_options == {"coordinate-descent-tuning": True}  # torch.compile's spelling too


def test_fp8_keys_reach_the_engine_and_a_bad_one_names_the_field(ckpt):
    """One key decides which forwards of an fp8 deployment stay bf16, one whether its MLP runs block-scaled; unset,
    the engine's defaults hold."""
    from dit_runtime.engine.fast_paths import FastPaths

    default, every_size = AppArgs.parse({"models": [model_args("a", ckpt),
                                                    model_args("b", ckpt, fp8_min_rows=0, fp8_blocks=False)]}).models
    assert default.engine_config().fast_paths.fp8_min_rows == FastPaths.fp8_min_rows > 0
    assert default.engine_config().fast_paths.fp8_blocks is FastPaths.fp8_blocks is True
    assert every_size.engine_config().fast_paths.fp8_min_rows == 0
    assert every_size.engine_config().fast_paths.fp8_blocks is False
    for key, bad in (("fp8_min_rows", -1), ("fp8_blocks", "sometimes")):
        message = error_of({"models": [model_args("c", ckpt, **{key: bad})]})
        assert key in message, message


def test_gateway_resources_pin_it_and_bad_ones_name_the_field(ckpt):
    from serving.app import _gateway_deployment

    args = AppArgs.parse({"models": [model_args("d", ckpt)], "gateway": {"resources": {"dit-gateway": 0.01}}})
    options = _gateway_deployment(args).ray_actor_options
    assert options["resources"] == {"dit-gateway": 0.01} and options["num_cpus"] == args.gateway.num_cpus
    assert "resources" not in _gateway_deployment(AppArgs.parse({"models": [model_args("d", ckpt)]})).ray_actor_options
    for bad, needle in (({"CPU": 1}, "use num_cpus"), ({"head": 0}, "positive amount")):
        message = error_of({"models": [model_args("d", ckpt)], "gateway": {"resources": bad}})
        assert "gateway.resources" in message and needle in message, message

"""Typed arguments of the serving app: the ``args`` block of serve_config.yaml, validated once at start-up.

A bad value fails ``serve run`` before anything is deployed, with a message naming the field
(``models[1].checkpoint``, ``limits.max_images_per_request``) and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from dit_runtime.contract import SamplingContract, random_student_contract, recorded_contract
from dit_runtime.request import RequestLimits, rows_per_image

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Ray Serve's switches for the direct-ingress layout (serve_config.gpu.yaml: HAProxy in front of each model replica's
# own HTTP server, no Python proxy on the path), read from the environment by Serve's controller when it starts. The
# Docker image sets them in its ENV (tests/serving/test_serve_docker.py holds it to these); the benchmarks set them.
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def model_deployment_name(model: str) -> str:
    """The Ray Serve deployment name of a model (what `serve status` and the ``deployment`` metric tag show)."""
    return f"model-{model}"


class _Args(BaseModel):
    # Unknown keys are errors: a typo in the YAML must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Limits(_Args):
    """What one request may ask for; the API refuses the rest with a 400 naming the field and the range.

    The keys the engine enforces are ``RequestLimits``' (dit_runtime/request.py): their defaults and ranges are
    declared there, and read here."""

    max_images_per_request: int = Field(RequestLimits.max_images_per_request, description="upper bound of `n`")
    max_inference_steps: int = Field(RequestLimits.max_inference_steps,
                                     description="upper bound of `num_inference_steps`")
    max_guidance_scale: float = Field(RequestLimits.max_guidance_scale,
                                      description="upper bound of `guidance_scale` (>= 1)")
    max_image_side: int = Field(RequestLimits.max_image_side,
                                description="largest `size` side in pixels; images are upscaled by whole factors")
    default_inference_steps: int | None = Field(None, ge=1, description="steps when a request names none (at most "
                                                                        "max_inference_steps); default: the "
                                                                        "checkpoint's recommended one (its "
                                                                        "sampling contract)")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(120.0, gt=0, description="deadline of a request, from its arrival at the "
                                                              "gateway; past it, 504 and its images leave the batch")

    @field_validator(*RequestLimits.RANGES)
    @classmethod
    def _in_engine_range(cls, value, info: ValidationInfo):
        RequestLimits.check_key(info.field_name, value)
        return value

    @model_validator(mode="after")
    def _default_within_max(self) -> "Limits":
        if self.default_inference_steps is not None and self.default_inference_steps > self.max_inference_steps:
            raise ValueError(f"default_inference_steps ({self.default_inference_steps}) must be <= "
                             f"max_inference_steps ({self.max_inference_steps})")
        return self

    def request_limits(self) -> RequestLimits:
        """The engine's view of these limits (the rest are the HTTP server's: body size, timeout)."""
        return RequestLimits(**{name: getattr(self, name) for name in RequestLimits.RANGES})


class Autoscaling(_Args):
    """Ray Serve autoscaling of one model deployment (passed through as its ``autoscaling_config``)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # What the replica count follows: the engines' estimated wait for a new request (serving.autoscaling, the
    # default), or Ray's own count of requests in flight per replica against target_ongoing_requests.
    signal: Literal["queue_wait", "ongoing_requests"] = "queue_wait"
    # queue_wait: the wait aimed at; default half the model's max_queue_wait_s, so it grows before it sheds.
    target_queue_wait_s: float | None = Field(None, gt=0)
    # ongoing_requests: default the guided one-image requests that fill one batch (ModelArgs.guided_images_per_batch).
    target_ongoing_requests: float | None = Field(None, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    # The window load is averaged over; keep it above Ray's metrics push interval (10 s unless set by env).
    look_back_period_s: float = Field(15.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must be within "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]")
        return self


class ModelArgs(_Args):
    """One served model size: where its weights come from, how its engine runs, and its Ray resources."""

    _null_row: bool = PrivateAttr(True)  # a guided image takes a null row (set from the contract at validation)
    _contract: SamplingContract | None = PrivateAttr(None)  # the checkpoint's, read at validation (None: unreadable)

    name: str = Field(description="the `model` id clients ask for, e.g. digits-s or dit-10l")
    checkpoint: str | None = Field(None, description="a .safetensors checkpoint; relative paths are resolved "
                                                     "against the directory `serve run` starts in")
    preset: str | None = Field(None, description="random-weight model preset (benchmarks only; needs "
                                                 "allow_random_weights)")
    allow_random_weights: bool = False
    random_weights_as: Literal["teacher", "student"] = Field(
        "teacher", description="with `preset`: serve the random weights under a teacher's sampling contract, or a "
                               "4-step student's (one row per guided image; benchmarks of the served path at student "
                               "rates)")
    vae: str | None = Field(None, description="local diffusers AutoencoderKL folder that decodes a latent-space "
                                              "checkpoint's samples into images (required for those)")
    compile_decoder: bool = Field(False, description="torch.compile the VAE decoder at start-up, with a symbolic "
                                                     "batch size, and decode every batch size once then")
    decoder_cuda_graphs: bool = Field(False, description="with compile_decoder on a GPU: capture the decoder as CUDA "
                                                         "graphs, each batch padded to the next multiple of four")
    decoder_compile_options: dict | None = Field(None, description="with compile_decoder: inductor options for the "
                                                                   "decoder's torch.compile, e.g. {max_autotune: true} "
                                                                   "(minutes of search per program at start)")
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "fp16", "bf16", "fp8"] = Field(
        "fp32", description="fp32 on the CPU; fp16 or bf16 on a GPU; fp8: FP8 GEMMs in the blocks (Ada, Hopper or "
                            "newer), bf16 elsewhere")
    fp8_min_rows: int | None = Field(None, ge=0, description="precision fp8: forwards of fewer token rows (batch x "
                                                             "tokens; one guided dit-10l image is 512) run in bf16, "
                                                             "where FP8 does not pay; 0: FP8 at every size; default: "
                                                             "the engine's (FastPaths.fp8_min_rows)")
    fp8_blocks: bool | None = Field(None, description="precision fp8: the MLP's fc1 writes GELU's output as e4m3 in "
                                                      "1x128 blocks from its GEMM and fc2 takes them (widths multiples "
                                                      "of 128); false: per-row scales and a GELU pass; default: the "
                                                      "engine's (FastPaths.fp8_blocks, on)")
    compile: bool = False
    cuda_graphs: bool = False
    max_batch_size: int = Field(32, ge=1, description="rows per forward pass (a guided image takes two)")
    # 2 s is a few times one request's own denoising on a full batch (0.6 s for dit-10l's 25 guided steps at 128 rows
    # on an H200): a burst is absorbed, a sustained overload is refused at once instead of queued as deep as it goes.
    max_queue_wait_s: float = Field(2.0, gt=0, description="a request whose estimated wait for a batch slot passes "
                                                           "this (or its deadline) is refused at once with 429 and "
                                                           "a Retry-After from the estimate "
                                                           "(EngineConfig.max_queue_wait_s)")
    max_queue_size: int = Field(256, ge=1, description="images waiting for a batch slot, a memory guard; past it, 429")
    batch_buckets: list[int] | None = None
    default_inference_steps: int | None = Field(None, ge=1, description="this model's steps when a request names "
                                                "none, over `limits.default_inference_steps` (a 4-step student "
                                                "beside 50-step teachers); default: the app's, else the "
                                                "checkpoint's recommended one")
    default_cache: str = Field("off", description="the `cache` preset of a request that names none: off, "
                                                  "balanced or fast (docs/benchmarks.md has their quality and speed)")
    feature_cache_rows: int | None = Field(None, ge=0, description="image rows whose feature cache the replica "
                                                                   "holds at once; default: max_batch_size; 0: none "
                                                                   "(requests may then ask only for cache off)")
    compile_cache_dir: str | None = Field(None, description="where compiled code is kept across starts: inductor's "
                                                            "caches, and the saved programs (compile_programs)")
    compile_programs: bool = Field(True, description="with compile_cache_dir: save each compiled step program (and "
                                                     "the compiled decoder's) whole and load it at the next start "
                                                     "instead of tracing again (torch's experimental ahead-of-time "
                                                     "compile)")
    compile_options: dict | None = Field(None, description="inductor options for the engine's torch.compile, e.g. "
                                                           "{max_autotune: true} (minutes of GEMM search at start)")
    compile_dynamic: bool = Field(False, description="one compiled program with a symbolic batch size for every "
                                                     "bucket (a faster cold start) instead of one per bucket "
                                                     "(static shapes: 2.5% more throughput at 256 rows)")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    encode_threads: int | None = Field(None, ge=1, description="threads that encode the replica's answers (PNG, "
                                       "JPEG, WebP); default: the CPUs the replica's process may run on, at most 4 "
                                       "(more measured slower: docs/benchmarks.md)")
    stall_stacks: bool = Field(False, description="for diagnosis: during each long hold of every Python thread of "
                               "the replica (serving.model_server.STALL_DUMP_S), write every thread's stack to its "
                               "stderr (Ray's worker-*.err; faulthandler's watchdog reads them without the GIL)")
    # Ray's router may hold at most this many requests on a replica. The default leaves room for a full batch plus
    # the engine's queue, so the engine (not Ray's default of 5) decides what runs and what is shed.
    max_ongoing_requests: int | None = Field(None, ge=1)
    # Requests Ray's router holds for this deployment while every replica is at max_ongoing_requests (or while no
    # replica runs, e.g. during a restart); past it the gateway answers 503 at once instead of queueing without bound.
    max_queued_requests: int = Field(256, ge=1)
    # Checkpoints are verified against the sha256 in manifest.json beside them before they are loaded
    # (`python -m serving.manifest checkpoints/` writes it). Off only for files you produced yourself.
    verify_manifest: bool = True
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    # How long a replica that is being replaced (redeploy, downscale) may finish its requests; default: the
    # request deadline plus a margin, so a redeploy never cuts a request that could still succeed.
    graceful_shutdown_timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        if isinstance(values, dict) and "dtype" in values:
            raise ValueError(f"`dtype` is now `precision`: fp32, fp16, bf16 or fp8 (got dtype {values['dtype']!r})")
        return values

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not MODEL_NAME.match(v):
            raise ValueError(f"model name {v!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit")
        return v

    @model_validator(mode="after")
    def _weights_and_device(self) -> "ModelArgs":
        if self.checkpoint is None and self.preset is None:
            raise ValueError("give `checkpoint` (a .safetensors file), or `preset` with `allow_random_weights: true`")
        if self.checkpoint is not None and self.preset is not None:
            raise ValueError("give either `checkpoint` or `preset`, not both")
        if self.random_weights_as != "teacher" and self.preset is None:
            raise ValueError("random_weights_as applies to `preset` (random weights); a checkpoint carries its own "
                             "sampling contract")
        if self.preset is not None and not self.allow_random_weights:
            raise ValueError(f"preset {self.preset!r} without a checkpoint serves random weights (noise): set "
                             "`allow_random_weights: true` if that is what you want (benchmarks), or give `checkpoint`")
        if self.checkpoint is not None:
            path = Path(self.checkpoint).expanduser().resolve()
            if path.suffix != ".safetensors":
                # Pickle-based formats (.pt, .bin, .ckpt) can run code when loaded: the server never opens them.
                raise ValueError(f"checkpoint {path.name!r} is not a .safetensors file; the server loads only "
                                 "safetensors (convert a .pt with `dit-convert`)")
            if not path.is_file():
                raise ValueError(f"checkpoint file not found: {path}")
            self.checkpoint = str(path)  # replicas may start in another directory
        if self.vae is not None:
            vae = Path(self.vae).expanduser().resolve()
            if not (vae / "config.json").is_file():
                raise ValueError(f"vae {vae} is not a diffusers AutoencoderKL folder (no config.json)")
            self.vae = str(vae)
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("device 'cuda' needs num_gpus > 0 (a fraction such as 0.5 shares a GPU)")
        if self.device == "cpu" and self.num_gpus > 0:
            raise ValueError(f"num_gpus {self.num_gpus} with device 'cpu' reserves a GPU that is not used")
        if self.checkpoint is not None:
            self._contract = recorded_contract(self.checkpoint)
            self._null_row = self._contract is None or self._contract.null_row
        else:
            self._contract = random_student_contract() if self.random_weights_as == "student" else None
            self._null_row = self.random_weights_as == "teacher"
        if self.default_inference_steps is not None:
            self.check_default_steps(self.default_inference_steps)
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.guided_images_per_batch:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) below the "
                             f"{self.guided_images_per_batch} guided one-image requests that fill a batch "
                             f"(max_batch_size {self.max_batch_size}, {rows_per_image(self._null_row)} rows an image) "
                             "would keep the engine's batch from filling")
        self.engine_config()  # the engine's own checks (precision vs device, buckets ...), reported here
        return self

    def default_steps(self, limits: Limits) -> int | None:
        """This model's default step count: its own ``default_inference_steps``, else the app's; None: the
        checkpoint's recommended one."""
        return self.default_inference_steps if self.default_inference_steps is not None \
            else limits.default_inference_steps

    def check_default_steps(self, steps: int) -> None:
        """A ValueError when the checkpoint's contract refuses ``steps`` as a default (a student takes only the
        counts it was trained for), saying which it takes."""
        if self._contract is None:
            return
        try:
            self._contract.with_overrides(num_inference_steps=steps)
        except ValueError as e:
            counts = self._contract.step_counts
            why = f"a student of {', '.join(map(str, counts))} steps" if counts else str(e)
            raise ValueError(f"default_inference_steps {steps} does not fit model {self.name!r} ({why}): set the "
                             "model's own `default_inference_steps`") from None

    def engine_config(self, limits: Limits | None = None):
        """The engine's config for this model; ``limits`` caps what one request may ask for."""
        from dit_runtime.engine.fast_paths import FastPaths  # imports torch: only where an engine runs
        from dit_runtime.engine.types import EngineConfig
        limits = limits or Limits()
        given = {"fp8_min_rows": self.fp8_min_rows, "fp8_blocks": self.fp8_blocks}
        fast_paths = FastPaths(**{name: value for name, value in given.items() if value is not None})
        return EngineConfig(fast_paths=fast_paths, device=self.device, precision=self.precision,
                            max_batch_size=self.max_batch_size,
                            max_queue_size=self.max_queue_size, max_queue_wait_s=self.max_queue_wait_s,
                            limits=limits.request_limits(),
                            default_inference_steps=self.default_steps(limits), compile=self.compile,
                            cuda_graphs=self.cuda_graphs,
                            batch_buckets=tuple(self.batch_buckets) if self.batch_buckets else None,
                            compile_cache_dir=self.compile_cache_dir, compile_options=self.compile_options,
                            compile_dynamic=self.compile_dynamic, compile_programs=self.compile_programs,
                            default_cache=self.default_cache, feature_cache_rows=self.feature_cache_rows,
                            compile_decoder=self.compile_decoder, decoder_cuda_graphs=self.decoder_cuda_graphs,
                            decoder_compile_options=self.decoder_compile_options)

    @property
    def guided_images_per_batch(self) -> int:
        """Guided one-image requests that fill one forward pass (at least one): what is sized by requests in flight
        assumes guided images, the common case and the larger. A student's guided image is one row (its contract,
        read from the checkpoint's header); a teacher's two."""
        return max(1, self.max_batch_size // rows_per_image(self._null_row))

    @property
    def ongoing_requests_cap(self) -> int:
        return self.max_ongoing_requests or self.max_batch_size + self.max_queue_size

    def gateway_in_flight_cap(self, gateway_replicas: int) -> int:
        """Requests of this model one gateway replica lets through at once: what its replicas hold of guided
        one-image requests (the common case: a full batch running, the queue full), shared between the gateway
        replicas. At this cap the gateway refuses before the engine has to: the engine's own 429 (admission by
        time, dit_runtime/engine/admission.py) is the slower path, through a replica busy denoising."""
        held = min(self.ongoing_requests_cap, self.guided_images_per_batch + self.max_queue_size)
        return max(1, math.ceil(self.autoscaling.max_replicas * held / gateway_replicas))

    def ray_autoscaling_config(self) -> dict:
        a = self.autoscaling
        out = a.model_dump(exclude_none=True, exclude={"signal", "target_queue_wait_s"})
        out["target_ongoing_requests"] = a.target_ongoing_requests or self.guided_images_per_batch
        if a.signal == "queue_wait":
            target = a.target_queue_wait_s or self.max_queue_wait_s / 2
            out["policy"] = {"policy_function": "serving.autoscaling:QueueWaitPolicy",
                             "policy_kwargs": {"target_queue_wait_s": target}}
        return out


class GatewayArgs(_Args):
    """The FastAPI ingress deployment: thin, no torch; one replica serves thousands of requests in flight."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(2000, ge=1)
    resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources each gateway replica "
                                        "takes: only nodes started with them (`ray start --resources`) hold a "
                                        "gateway, e.g. the head, so that losing a worker leaves the API up")

    @field_validator("resources")
    @classmethod
    def _resources_ok(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or not name:
                raise ValueError(f"{name!r} is not a custom resource: use num_cpus for CPUs; resources names what "
                                 "`ray start --resources` gave a node")
            if not amount > 0:
                raise ValueError(f"resource {name!r} must be a positive amount, got {amount!r}")
        return v


class AuthArgs(_Args):
    """Optional API keys for the /v1 routes (``Authorization: Bearer <key>``); /healthz, /readyz and the metrics
    port stay open. No key found in either place: the API is open (fine on 127.0.0.1, see docs/reliability.md)."""

    api_keys_env: str | None = Field("DIT_API_KEYS", description="environment variable of the gateway's processes "
                                                                 "holding comma-separated keys")
    api_keys_file: str | None = Field(None, description="a file with one key per line (# comments allowed); read "
                                                        "by the gateway replicas, so it must exist on their nodes")

    @field_validator("api_keys_file")
    @classmethod
    def _file_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        path = Path(v).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"API key file not found: {path}")
        return str(path)


class AppArgs(_Args):
    """Everything `serve_config.yaml` passes to ``build_app``."""

    models: list[ModelArgs] = Field(min_length=1)
    limits: Limits = Field(default_factory=Limits)
    gateway: GatewayArgs = Field(default_factory=GatewayArgs)
    auth: AuthArgs = Field(default_factory=AuthArgs)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelArgs]) -> list[ModelArgs]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return models

    @model_validator(mode="after")
    def _default_steps_fit(self) -> "AppArgs":
        """Each model's default step count within the limits, and the app's default within the contract of each
        model that has none of its own (a model's own was checked with it), told at validation rather than when a
        replica starts."""
        for i, m in enumerate(self.models):
            steps = m.default_steps(self.limits)
            if steps is None:
                continue
            own = m.default_inference_steps is not None
            source = f"models[{i}].default_inference_steps" if own else "limits.default_inference_steps"
            if steps > self.limits.max_inference_steps:
                raise ValueError(f"{source} ({steps}) must be <= limits.max_inference_steps "
                                 f"({self.limits.max_inference_steps})")
            if not own:
                try:
                    m.check_default_steps(steps)
                except ValueError as e:
                    raise ValueError(f"{source}: {e}") from None
        return self

    @classmethod
    def parse(cls, raw: dict | "AppArgs") -> "AppArgs":
        """Validate, raising a ValueError whose lines name each bad field (``models[0].checkpoint: ...``)."""
        if isinstance(raw, cls):
            return raw
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ValueError("invalid serving config (the `args` of serve_config.yaml):\n" + format_errors(e)) from None


def format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        # The input, unless there is none, it is a whole section, or the message gives it (", got ...") already.
        said = err["type"] == "missing" or isinstance(err["input"], dict) or ", got " in msg
        got = "" if said else f" (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}{got}" if loc else f"  {msg}{got}")  # a check across sections names its fields
    return "\n".join(lines)

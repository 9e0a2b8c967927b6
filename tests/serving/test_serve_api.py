"""The HTTP API under real Ray Serve on the CPU: the openai client, determinism, SSE, every error case, health,
models, and a real Prometheus server scraping the app's metrics. One Ray start-up for the whole module."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from serve_helpers import free_port, model_args

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from serving.app import build_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

LIMITS = {"max_images_per_request": 4, "max_inference_steps": 60, "max_guidance_scale": 10.0,
          "max_image_side": 64, "max_body_bytes": 4096, "default_inference_steps": 8}


class Server:
    def __init__(self, base: str, metrics_port: int):
        self.base = base
        self.metrics_port = metrics_port
        self.http = httpx.Client(base_url=base, timeout=60)

    def generate(self, **body) -> httpx.Response:
        return self.http.post("/v1/images/generations", json=body)


@pytest.fixture(scope="module")
def server(checkpoints):
    metrics_port = free_port()
    # address="local": a fresh cluster for this module even if a `ray start` cluster runs on the machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"limits": LIMITS, "models": [
        model_args("digits-s", checkpoints["digits-s"]),
        model_args("digits-m", checkpoints["digits-m"]),
        # One guided image per step and one waiting: easy to fill, for the overload case.
        model_args("digits-q", checkpoints["digits-s"], max_batch_size=2, max_queue_size=1),
    ]}
    serve.run(build_app(args), name="dit", route_prefix="/")
    yield Server(f"http://127.0.0.1:{port}", metrics_port)
    serve.shutdown()
    ray.shutdown()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_openai_client_generates_pngs_of_the_model_resolution(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused")
    out = client.images.generate(model="digits-s", prompt="3", n=2, response_format="b64_json",
                                 extra_body={"seed": 1})
    assert len(out.data) == 2
    images = [decode(d.b64_json) for d in out.data]
    assert all(im.shape == (16, 16) and im.dtype == np.uint8 for im in images)
    assert not np.array_equal(images[0], images[1])  # image k's noise depends on (seed, k)


def test_same_seed_same_images_other_seed_other_images(server):
    body = dict(model="digits-m", prompt="7", n=2, seed=11, num_inference_steps=6)
    first, again, other = (server.generate(**b).json() for b in (body, body, {**body, "seed": 12}))
    assert first["seed"] == 11
    assert [d["b64_json"] for d in first["data"]] == [d["b64_json"] for d in again["data"]]
    assert decode(first["data"][0]["b64_json"]).tolist() != decode(other["data"][0]["b64_json"]).tolist()


def test_same_seed_same_images_under_concurrent_batch_neighbours(server):
    """Byte-equal PNGs: digits-s runs every forward at 16 rows (max_batch_size 16 is the CPU's one bucket), so the
    request meets the same kernels at the same shapes alone and in the crowd (tests/test_engine.py says more)."""
    body = dict(model="digits-s", prompt="5", seed=3, num_inference_steps=8)
    alone = server.generate(**body).json()["data"][0]["b64_json"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(server.generate, model="digits-s", prompt=str(i), seed=100 + i) for i in range(6)]
        crowded = pool.submit(server.generate, **body)
        assert all(f.result().status_code == 200 for f in noise)
    assert crowded.result().json()["data"][0]["b64_json"] == alone


def test_prompt_class_name_class_id_and_class_label_agree(server):
    def image(**k):
        return server.generate(model="digits-s", seed=5, num_inference_steps=5, **k).json()["data"][0]["b64_json"]
    assert image(prompt="three") == image(prompt="3") == image(class_label=3) == image(prompt=" THREE ")
    assert image(prompt="3") != image(prompt="4")


def test_size_upscales_the_model_image_by_a_whole_factor(server):
    body = dict(model="digits-s", prompt="1", seed=2, num_inference_steps=5)
    small = decode(server.generate(**body).json()["data"][0]["b64_json"])
    big = decode(server.generate(**body, size="48x48").json()["data"][0]["b64_json"])
    assert big.shape == (48, 48)
    assert np.array_equal(big, np.kron(small, np.ones((3, 3), dtype=np.uint8)))


def test_output_format_answers_jpeg_and_webp_files_of_the_same_images(server):
    """The OpenAI client's output_format and output_compression: each format's own file, decoding to the PNG's image
    within the lossy encoders' error; a lower quality gives a smaller file."""
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused")
    body = dict(model="digits-s", prompt="8", n=2, response_format="b64_json", extra_body={"seed": 4})
    png = client.images.generate(**body)
    assert png.output_format == "png"
    reference = np.stack([decode(d.b64_json) for d in png.data]).astype(int)
    for fmt, pillow_name in (("jpeg", "JPEG"), ("webp", "WEBP")):
        answer = client.images.generate(**body, output_format=fmt)
        assert answer.output_format == fmt
        files = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in answer.data]
        assert [f.format for f in files] == [pillow_name] * 2 and all(f.size == (16, 16) for f in files)
        images = np.stack([np.asarray(f.convert("L")) for f in files]).astype(int)
        assert np.abs(images - reference).mean() < 4, fmt  # the same digits, at the encoders' top quality
        small = client.images.generate(**body, output_format=fmt, output_compression=10)
        assert sum(map(len, (d.b64_json for d in small.data))) < sum(map(len, (d.b64_json for d in answer.data)))


def test_stream_sends_progress_for_every_step_then_the_same_images(server):
    body = dict(model="digits-s", prompt="2", n=2, seed=9, num_inference_steps=5)
    events = []
    with server.http.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    progress = [e for e in parsed if e["type"] == "image_generation.progress"]
    assert [(e["step"], e["num_steps"]) for e in progress] == [(k, 5) for k in range(1, 6)]
    done = parsed[-1]
    assert done["type"] == "image_generation.completed"
    assert [d["b64_json"] for d in done["data"]] == [d["b64_json"] for d in server.generate(**body).json()["data"]]


@pytest.mark.parametrize("body, status, param, needle", [
    ({"model": "nope", "prompt": "3"}, 404, "model", "digits-s"),
    ({"prompt": "3", "n": 5}, 400, "n", "[1, 4]"),
    ({"prompt": "3", "n": 0}, 400, "n", "[1, 4]"),
    ({"prompt": "3", "num_inference_steps": 61}, 400, "num_inference_steps", "[1, 60]"),
    ({"prompt": "3", "num_inference_steps": -2}, 400, "num_inference_steps", "[1, 60]"),
    ({"prompt": "3", "guidance_scale": 11}, 400, "guidance_scale", "[1, 10]"),
    ({"prompt": "3", "guidance_scale": "nan"}, 400, "guidance_scale", "finite"),
    ({"prompt": "3", "guidance_scale": 0.5}, 400, "guidance_scale", "[1, 10]"),
    ({"prompt": "3", "sampler": "euler"}, 400, "sampler", "ddpm, ddim, dpm-solver++"),
    ({"prompt": "eleven"}, 400, "prompt", "'zero', 'one'"),
    ({"prompt": "10"}, 400, "prompt", "[0, 9]"),
    ({"class_label": [1, 2, 3], "n": 2}, 400, "class_label", "n=2"),
    ({}, 400, "prompt", "class_label"),
    ({"prompt": "3", "size": "20x20"}, 400, "size", "16x16, 32x32"),
    ({"prompt": "3", "size": "128x128"}, 400, "size", "up to 64"),
    ({"prompt": "3", "response_format": "url"}, 400, "response_format", "b64_json"),
    ({"prompt": "3", "output_format": "gif"}, 400, "output_format", "png, jpeg, webp"),
    ({"prompt": "3", "output_compression": 50}, 400, "output_compression", "png is lossless"),
    ({"prompt": "3", "output_format": "jpeg", "output_compression": 101}, 400, "output_compression", "[0, 100]"),
    ({"prompt": "3", "n": "two"}, 400, "n", "valid integer"),
    ({"prompt": "3", "seed": -1}, 400, "seed", "[0, 2**63)"),
    ({"prompt": "3", "sead": 1}, 400, "sead", "unknown field"),
    ({"model": "digits-q", "prompt": "3", "n": 2}, 400, "n", "n <= 1"),
])
def test_invalid_requests_get_openai_errors_naming_the_field(server, body, status, param, needle):
    r = server.generate(**body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and needle in error["message"], error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_openai_client_raises_its_own_error_classes(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="nope", prompt="3")
    with pytest.raises(openai.BadRequestError, match="n must be an integer in"):
        client.images.generate(model="digits-s", prompt="3", n=5)


def test_body_too_large_is_413_and_non_json_is_400(server):
    big = json.dumps({"prompt": "3", "user": "x" * 200, "padding": "y" * 5000})
    r = server.http.post("/v1/images/generations", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 1000
    r = server.http.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = server.http.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_overload_is_refused_with_429_and_retry_after_and_the_accepted_finish(server):
    body = dict(model="digits-q", prompt="3", num_inference_steps=60)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda i: server.generate(**body, seed=i), range(10)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1, codes
    shed = next(r for r in answers if r.status_code == 429)
    assert int(shed.headers["retry-after"]) >= 1
    assert shed.json()["error"]["type"] == "rate_limit_error"


def test_models_list_describes_each_model(server):
    data = server.http.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["digits-s", "digits-m", "digits-q"]
    card = data[0]
    assert card["status"] == "ready" and card["resolution"] == [16, 16] and card["channels"] == 1
    assert card["space"] == "pixel" and card["class_names"][3] == "three" and card["parameters"] > 0
    assert card["precision"] == "fp32" and card["samplers"] == ["ddpm", "ddim", "dpm-solver++"]  # a CPU deployment
    assert server.http.get("/v1/models/digits-m").json()["id"] == "digits-m"
    assert server.http.get("/v1/models/nope").status_code == 404
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["digits-s", "digits-m", "digits-q"]


def test_health_readiness_openapi_and_unknown_routes(server):
    assert server.http.get("/healthz").json() == {"status": "ok"}
    ready = server.http.get("/readyz")
    assert ready.status_code == 200 and all(m["ready"] for m in ready.json()["models"].values())
    # Where the answering replica's start went, by phase (StartupTimes).
    assert all({"verify", "load", "compile", "total"} <= set(m["startup_s"]) for m in ready.json()["models"].values())
    spec = server.http.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])
    missing = server.http.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "route_not_found"


def test_prometheus_scrapes_the_app_and_reads_back_p99_latency(server, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("the `prometheus` binary is missing: run `make sysdeps` (installs Debian's prometheus)")
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: ray
    static_configs: [{{targets: ["127.0.0.1:{server.metrics_port}"]}}]
""")
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        latencies = []
        n_requests = 0
        query = ('histogram_quantile(0.99, sum by (le, model) '
                 '(rate(ray_dit_request_latency_seconds_bucket{model="digits-s", status="200"}[1m])))')
        p99 = None
        while time.monotonic() - started < 90:  # traffic until Prometheus has the series
            t0 = time.perf_counter()
            assert server.generate(model="digits-s", prompt="4", num_inference_steps=4).status_code == 200
            latencies.append(time.perf_counter() - t0)
            n_requests += 1
            if n_requests % 5 == 0:
                p99 = _query(prom_port, query)
                if p99 is not None and n_requests >= 20:
                    break
            time.sleep(0.05)
        assert p99 is not None, "Prometheus never got the latency histogram"
        assert 0 < p99 <= 60.0  # within the histogram's finite buckets, i.e. a real measurement
        # The latency histogram's largest finite bucket under the observed max bounds the p99 from above.
        assert p99 <= max(0.005, 2.5 * max(latencies))
        # Every answered image is counted, once Ray's metrics export and the next scrape have caught up (seconds).
        deadline = time.monotonic() + 30
        while True:
            images = _query(prom_port, 'sum(ray_dit_images_generated_total{model="digits-s"})')
            steps = _query(prom_port, 'sum(ray_dit_step_seconds_count{model="digits-s"})')
            # the replica's older-generation collections: serving allocates, so some ran after its heap was frozen
            collections = _query(prom_port, 'sum(ray_dit_gc_pause_seconds_count{model="digits-s", generation=~"1|2"})')
            if (images or 0) >= n_requests and collections or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert images >= n_requests and steps is not None and steps >= 4 * n_requests / 16  # earlier tests' count too
        assert collections is not None and collections > 0
        assert _query(prom_port, 'count(ray_dit_gc_pause_seconds_count{generation!~"1|2"})') is None  # no others
        compile_s = _query(prom_port, 'max(ray_dit_replica_startup_seconds{model="digits-s", phase="compile"})')
        assert compile_s is not None and compile_s > 0
        # Every series the shipped Grafana dashboard plots exists (ours and Ray Serve's own, side by side).
        dashboard = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        names = {n for e in exprs for n in re.findall(r"\b(ray_[a-z_]+)\b", e)}
        assert {"ray_dit_request_latency_seconds_bucket", "ray_serve_deployment_replica_healthy"} <= names
        missing = [n for n in sorted(names) if _query(prom_port, f'count({{__name__="{n}"}})') is None]
        assert not missing, f"dashboard series absent from the scrape: {missing}"
    finally:
        proc.terminate()
        proc.wait(10)


def _query(port: int, promql: str) -> float | None:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.HTTPError:
        return None
    result = r.json().get("data", {}).get("result", [])
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if np.isnan(value) else value


def tiny_latent_model(root: Path) -> tuple[Path, Path]:
    """A random latent-space checkpoint (8x8x4 latents) and a tiny diffusers AutoencoderKL folder to decode it."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    from dit_runtime.checkpoint import CheckpointInfo, default_class_names, save_checkpoint
    from dit_runtime.model import DiTModel, get_preset

    torch.manual_seed(0)
    model = DiTModel.from_config(get_preset("dit-tiny"))
    ckpt = save_checkpoint(root / "latent.safetensors", model.state_dict(),
                           CheckpointInfo(config=model.config, class_names=default_class_names(10), space="latent"))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8)
    vae.save_pretrained(root / "vae")
    return ckpt, root / "vae"


def test_latent_model_images_decode_through_its_vae(server, tmp_path):
    ckpt, vae = tiny_latent_model(tmp_path)
    serve.run(build_app({"limits": LIMITS, "models": [model_args("latent", ckpt, vae=str(vae),
                                                                 verify_manifest=False)]}),
              name="latent", route_prefix="/latent")
    try:
        r = server.http.post("/latent/v1/images/generations", json={"model": "latent", "prompt": "3", "seed": 0})
        assert r.status_code == 200, r.text
        image = decode(r.json()["data"][0]["b64_json"])
        assert image.shape == (64, 64, 3)  # 8x8 latents, 8x upsampled by the VAE into RGB
    finally:
        serve.delete("latent")


def test_latent_checkpoint_without_a_vae_is_refused_naming_what_to_set(tmp_path):
    from serving.config import Limits, ModelArgs
    from serving.model_server import ModelServer

    ckpt, _ = tiny_latent_model(tmp_path)
    server = ModelServer(ModelArgs(**model_args("latent", ckpt, verify_manifest=False)), Limits(**LIMITS))
    assert server.engine is None  # refused before the engine is built
    assert re.search(r"latent\.safetensors is a latent-space model: set `vae:`", server.load_error), server.load_error

"""Reliability and security under real Ray Serve on the CPU, one Ray cluster for the module: overload is shed fast,
deadlines and disconnects free the batch, a killed replica is replaced with every request answered, a redeploy
drains, bad checkpoints are reported by name, API keys guard /v1, and fuzzed or hostile input never gets a 5xx.

Figures go to stdout (`pytest -s`); docs/reliability.md records them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import SLOW_DIGITS, free_port, model_args, replica_pids, write_digits_checkpoint

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from serving.app import build_app, model_deployment_name  # noqa: E402
from serving.manifest import write_manifest  # noqa: E402

from benchmarks import overload, soak  # noqa: E402

LIMITS = {"max_images_per_request": 4, "max_inference_steps": 240, "max_guidance_scale": 10.0,
          "max_image_side": 64, "max_body_bytes": 4096, "default_inference_steps": 8}
# Long requests on a slower model: a deadline of 3 s passes mid-request; a disconnect at 0.5 s comes well before it.
DEADLINE_S = 3.0
SLOW_LIMITS = {"max_inference_steps": 1000, "request_timeout_s": DEADLINE_S}
# digits-w, the shipped digits-m, admits by time: nothing accepted waits longer than this for a batch slot (the
# default max_queue_wait_s).
SHIPPED_DIGITS_M = Path(__file__).resolve().parents[2] / "checkpoints" / "digits-m.safetensors"
WAIT_BOUND_S = 2.0
KEYS_ENV = "DIT_TEST_API_KEYS"
ENV_KEYS = ["sk-env-first", "sk-env-second"]
FILE_KEY = "sk-file-only"


def figure(name: str, **values) -> None:
    """Print one measured figure as a JSON line (docs/reliability.md quotes them)."""
    print(f"\nFIGURE {name} {json.dumps(values)}", flush=True)


class Cluster:
    def __init__(self, port: int, checkpoints: dict[str, Path], root: Path):
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.base, timeout=60)
        self.checkpoints = checkpoints
        self.root = root

    def generate(self, prefix: str = "", **body) -> httpx.Response:
        return self.http.post(f"{prefix}/v1/images/generations", json=body)

    def load(self, prefix: str, model: str) -> dict:
        return self.http.get(f"{prefix}/readyz").json()["models"][model]["load"]


@pytest.fixture(scope="module")
def cluster(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    checkpoints = {**checkpoints,
                   "digits-slow": write_digits_checkpoint(root / "digits-slow.safetensors", config=SLOW_DIGITS)}
    write_manifest(root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEYS_ENV, ",".join(ENV_KEYS))  # inherited by the Ray processes started below
        env.delenv("DIT_API_KEYS", raising=False)  # the main app runs without keys
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"limits": LIMITS, "models": [
            model_args("digits-s", checkpoints["digits-s"]),
            model_args("digits-q", checkpoints["digits-s"], max_batch_size=2, max_queue_size=1),
            model_args("digits-w", SHIPPED_DIGITS_M, max_batch_size=4, max_queue_size=512,
                       max_queue_wait_s=WAIT_BOUND_S),
        ]}), name="dit", route_prefix="/")
        serve.run(build_app({"limits": SLOW_LIMITS, "models": [model_args("digits-slow", checkpoints["digits-slow"])]}),
                  name="slow", route_prefix="/slow")
        yield Cluster(port, checkpoints, root)
        serve.shutdown()
        ray.shutdown()


def assert_openai_error(r: httpx.Response, status: int | tuple[int, ...]) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], error
    return error


# ---- overload ---------------------------------------------------------------------------------------------------
def refused_at_once(s: dict) -> None:
    """A refusal waits for no work: the typical one within a tenth of one request's service time and the slowest
    percent within a quarter, where a refusal held until a running request freed its slot would take half of one
    (at the median) or all of one. Not a fixed number of milliseconds: on two shared cores about one answer in 200
    of Ray's proxy takes 100-220 ms whatever the handler does (an empty 429 from a bare FastAPI deployment beside
    this one, same load: p50 27 ms, p99 67 ms, max 109 ms over 300; ours 26 / 90 / 101 ms), and under 100 refusals
    a p99 is their slowest or second slowest. The refusals' milliseconds are a figure of `python -m benchmarks
    overload` (bar: 100 ms), recorded in docs/reliability.md."""
    assert s["shed_p50_ms"] < 0.1 * s["service_ms"], s
    assert s["shed_p99_ms"] < 0.25 * s["service_ms"], s


def test_three_times_capacity_is_shed_fast_and_every_accepted_request_finishes(cluster):
    """digits-q holds one guided image in its batch and one waiting (two closed-loop clients fill it to measure its
    capacity): of 3x its capacity a good part is shed, and the refusals come at once (see refused_at_once). 35 s of
    overload and at least 90 requests, so a slow host sends as many; 20 refusals at least. 240 steps, so a request's
    service time (about 1 s on the 2-core EPYC) puts a quarter of it above Ray's proxy's own tail (100-220 ms): at
    60 steps (0.26 s) the bound was 65 ms, below what a bare deployment's 429s take at the 99th percentile, and the
    faster the host, the lower it sat."""
    body = {"model": "digits-q", "prompt": "3", "num_inference_steps": 240}
    report = overload.asyncio.run(overload.overload(cluster.base, body, factor=3.0, seconds=35.0, max_requests=1000,
                                                    clients=2, capacity_seconds=3.0, timeout=30.0, min_requests=90))
    s = report.summary()
    figure("overload", **s)
    assert s["failed"] == 0 and s["timed_out"] == 0, s
    assert s["accepted"] > 0 and s["shed"] >= 20, s
    refused_at_once(s)


def test_three_times_capacity_admitted_by_time_keeps_accepted_latency_under_the_wait_bound(cluster):
    """digits-w (the shipped digits-m, two guided images per batch, a 512-image queue) admits by estimated wait: at
    3x its capacity the accepted requests wait at most max_queue_wait_s for a batch slot and finish within that plus
    one request's service time (+10%), the rest are refused at once, nothing fails or hangs. At the 99th percentile
    the service time is the 99th percentile of closed-loop clients that keep its batch full with no queue (HTTP
    included): on two shared cores its spread is a third of its median. With a queue bounded only by count, accepted
    requests waited as long as the queue was deep (3.9 s on the GPU host, issue 19)."""
    body = {"model": "digits-w", "prompt": "3", "num_inference_steps": 60}
    report = overload.asyncio.run(overload.overload(cluster.base, body, factor=3.0, seconds=8.0, max_requests=400,
                                                    clients=2, capacity_seconds=4.0, timeout=30.0))
    s = report.summary()
    figure("overload-by-time", bound_s=WAIT_BOUND_S, **s)
    assert s["failed"] == 0 and s["timed_out"] == 0, s
    assert s["accepted"] > 0 and s["shed"] > 0, s
    assert s["accepted_queue_p99_ms"] <= 1.1 * 1000 * WAIT_BOUND_S, s  # what admission by time promises
    assert s["accepted_p99_ms"] <= 1.1 * (1000 * WAIT_BOUND_S + s["service_p99_ms"]), s
    refused_at_once(s)


def test_a_soak_at_80_percent_of_capacity_fails_nothing_and_holds_its_memory(cluster):
    """The CI length of `python -m benchmarks soak` (10 minutes on the GPU host): digits-s at 80% of its measured
    capacity for 40 s. Nothing fails or times out, and the replica's resident memory after the first 10 s (warm-up)
    grows less than 1%. The p99's drift between the first and last window is reported, not held: on two shared
    cores it is the neighbours' doing as much as the server's (the benchmark holds it, on a host of its own)."""
    body = {"model": "digits-s", "prompt": "3"}
    pids = lambda: replica_pids("dit", model_deployment_name("digits-s"))  # noqa: E731
    report = soak.asyncio.run(soak.soak(cluster.base, body, pids, load=soak.LOAD, seconds=40.0, window_s=10.0,
                                        sample_every_s=2.0, clients=4, capacity_seconds=3.0))
    s = report.summary()
    figure("soak", **s, windows=report.windows())
    assert s["failed"] == 0 and s["timed_out"] == 0 and s["sent"] > 0, s
    assert s["rss_growth"] is not None and s["rss_growth"] < soak.MAX_MEMORY_GROWTH, s
    started = datetime.fromisoformat(s["started_at"]).timestamp()  # on the clock of the replica's log
    assert 0 < time.time() - started < 300, s


# ---- deadlines and disconnects ----------------------------------------------------------------------------------
def test_request_past_its_deadline_gets_504_and_leaves_the_batch(cluster):
    probe = cluster.generate("/slow", model="digits-slow", prompt="1", num_inference_steps=5, seed=0)
    assert probe.status_code == 200, probe.text  # 5 steps: well inside the deadline on a host 10x slower than ours
    step_s = probe.json()["timings"]["denoise_seconds"] / 5
    started = time.perf_counter()
    r = cluster.generate("/slow", model="digits-slow", prompt="1", num_inference_steps=1000, seed=0)
    elapsed = time.perf_counter() - started
    error = assert_openai_error(r, 504)
    assert error["code"] == "deadline_exceeded" and error["type"] == "timeout_error"
    assert cluster.load("/slow", "digits-slow")["running_requests"] == 0
    figure("deadline", deadline_s=DEADLINE_S, answered_after_s=round(elapsed, 3), step_ms=round(1000 * step_s, 2))
    # Answered at the deadline, not after the 1000 steps; the slack is one step plus the trip through Ray.
    assert DEADLINE_S - 0.05 <= elapsed < DEADLINE_S + 1.0, elapsed


def test_streamed_request_past_its_deadline_ends_with_a_504_event(cluster):
    with cluster.http.stream("POST", "/slow/v1/images/generations",
                             json={"model": "digits-slow", "prompt": "2", "num_inference_steps": 1000,
                                   "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["type"] == "image_generation.progress" and events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "deadline_exceeded"


def _wait_batch_empty(cluster: Cluster, timeout: float = 10.0) -> tuple[float, dict]:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        load = cluster.load("/slow", "digits-slow")
        if load["running_requests"] == 0:
            return time.perf_counter() - started, load
        time.sleep(0.02)
    raise AssertionError(f"the batch did not empty within {timeout} s: {load}")


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_disconnects_frees_its_batch_rows(cluster, stream):
    """The proxy sees the client go; Ray cancels the gateway's call and the replica's; the engine drops the rows."""
    body = {"model": "digits-slow", "prompt": "4", "num_inference_steps": 1000, "stream": stream}
    with httpx.Client(base_url=cluster.base) as client:
        if stream:
            with client.stream("POST", "/slow/v1/images/generations", json=body, timeout=30) as r:
                lines = r.iter_lines()
                while not next(lines).startswith("data: {\"type\": \"image_generation.progress\""):
                    pass
                before = cluster.load("/slow", "digits-slow")
        else:
            def probe():
                time.sleep(0.5)
                probe.load = cluster.load("/slow", "digits-slow")
            t = threading.Thread(target=probe)
            t.start()
            with pytest.raises(httpx.ReadTimeout):
                client.post("/slow/v1/images/generations", json=body, timeout=0.6)  # the client gives up
            t.join()
            before = probe.load
    assert before["running_requests"] == 1, before
    seconds, after = _wait_batch_empty(cluster)
    figure("disconnect", stream=stream, batch_empty_after_s=round(seconds, 3),
           steps_after_disconnect=after["steps_done"] - before["steps_done"])
    assert seconds < 1.5, seconds  # well before the 3 s deadline would have dropped it


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param, needle", [
    ({"prompt": "3", "n": 10 ** 9}, "n", "[1, 4]"),
    ({"prompt": "3", "n": 2 ** 70}, "n", "[1, 4]"),
    ({"prompt": "3", "num_inference_steps": 10 ** 12}, "num_inference_steps", "[1, 240]"),
    ({"prompt": "3", "num_inference_steps": -5}, "num_inference_steps", "[1, 240]"),
    ({"prompt": "3", "num_inference_steps": 2.5}, "num_inference_steps", "integer"),
    ({"prompt": "3", "guidance_scale": "inf"}, "guidance_scale", "finite"),
    ({"prompt": "3", "guidance_scale": "-Infinity"}, "guidance_scale", "finite"),
    ({"prompt": "3", "sampler": "euler_a"}, "sampler", "ddpm, ddim, dpm-solver++"),
    ({"prompt": ["3"]}, "prompt", "valid string"),
    ({"prompt": 3}, "prompt", "valid string"),
    ({"prompt": "3", "stream": "yes please"}, "stream", "boolean"),
    ({"prompt": "3", "class_label": {"a": 1}}, "class_label", ""),
    ({"prompt": "3", "seed": 2 ** 64}, "seed", "[0, 2**63)"),
    ({"prompt": "三"}, "prompt", "unknown class"),
    ({"prompt": "٣"}, "prompt", "digits 0-9"),
    ({"prompt": "³"}, "prompt", "digits 0-9"),
    ({"prompt": "th\u0000ree"}, "prompt", "unknown class"),
    ({"prompt": "\U0001f600" * 300}, "prompt", "unknown class"),
    ({"prompt": "3", "model": "dígits-s"}, "model", "digits-s"),
    ({"prompt": "3", "model": "x" * 65}, "model", "at most 64"),
])
def test_hostile_fields_get_a_400_or_404_naming_the_field(cluster, body, param, needle):
    error = assert_openai_error(cluster.generate(**body), (400, 404))
    assert error["param"] == param and needle in error["message"], error


@pytest.mark.parametrize("content, content_type, status, code", [
    (b"x" * (10 * 1024 * 1024), "application/json", 413, "body_too_large"),
    (b"\xff\xfe not json", "application/json", 400, "invalid_json"),
    (b'{"prompt": "3", "n": NaN}', "application/json", 400, "invalid_value"),
    (b'{"prompt": "3", "guidance_scale": NaN}', "application/json", 400, "invalid_value"),
    (b'{"prompt": "3", "guidance_scale": 1e999}', "application/json", 400, "invalid_value"),
    (b'{"prompt": "3"', "application/json", 400, "invalid_json"),
    (b"[1, 2, 3]", "application/json", 400, "invalid_value"),
    (b"null", "application/json", 400, None),
    (b"", "application/json", 400, None),
    (b"prompt=3", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b'{"prompt": "3"}', "text/plain", 415, "unsupported_media_type"),
])
def test_bodies_that_are_not_a_request_get_openai_errors(cluster, content, content_type, status, code):
    r = cluster.http.post("/v1/images/generations", content=content, headers={"content-type": content_type})
    error = assert_openai_error(r, status)
    assert code is None or error["code"] == code, error


def test_schemathesis_finds_no_5xx_and_every_4xx_is_openai_shaped(cluster):
    """At least 500 cases generated from the live /openapi.json, valid and invalid, across every route."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(cluster.base + "/openapi.json")
    examples = {("POST", "/v1/images/generations"): 260, ("GET", "/v1/models/{model}"): 60}
    tried: dict[str, int] = {}
    problems: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        key = (op.method.upper(), op.path)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=examples.get(key, 20), deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                r = case.call(base_url=cluster.base, timeout=60)
                label = f"{op.method.upper()} {op.path}"
                tried[label] = tried.get(label, 0) + 1
                if r.status_code >= 500:
                    problems.append(f"{label} -> {r.status_code}: {r.text[:200]} for {case.body!r}"[:400])
                elif r.status_code >= 400:
                    try:
                        error = r.json()["error"]
                        assert set(error) == {"message", "type", "param", "code"}
                    except Exception:
                        problems.append(f"{label} -> {r.status_code} not in OpenAI's shape: {r.text[:200]}")
            try:
                run()
            except Unsatisfiable:  # no invalid input exists for a route without parameters (e.g. /healthz)
                pass
    total = sum(tried.values())
    figure("schemathesis", cases=total, per_route=tried, problems=len(problems))
    assert not problems, problems[:10]
    assert total >= 500, tried


# ---- security ---------------------------------------------------------------------------------------------------
def test_api_keys_guard_v1_and_leave_health_open(cluster):
    keys = cluster.root / "api-keys.txt"
    keys.write_text(f"# one key per line\n{FILE_KEY}\n")
    serve.run(build_app({"limits": LIMITS, "auth": {"api_keys_env": KEYS_ENV, "api_keys_file": str(keys)},
                         "models": [model_args("digits-k", cluster.checkpoints["digits-s"])]}),
              name="auth", route_prefix="/auth")
    try:
        url = "/auth/v1/images/generations"
        body = {"prompt": "3", "num_inference_steps": 2}
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {ENV_KEYS[0]}"},
                        {"Authorization": "Bearer"}, {"Authorization": f"Bearer {ENV_KEYS[0]}x"}):
            r = cluster.http.post(url, json=body, headers=headers)
            error = assert_openai_error(r, 401)
            assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert cluster.http.get("/auth/v1/models").status_code == 401
        for key in (*ENV_KEYS, FILE_KEY):
            r = cluster.http.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        for open_route in ("/auth/healthz", "/auth/readyz", "/auth/openapi.json"):
            assert cluster.http.get(open_route).status_code == 200, open_route
        client = openai.OpenAI(base_url=cluster.base + "/auth/v1", api_key=FILE_KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["digits-k"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=cluster.base + "/auth/v1", api_key="sk-nope", max_retries=0).models.list()
        # The app without keys stays open: the other tests of this module never send one.
        assert cluster.generate(prompt="3", num_inference_steps=2).status_code == 200
    finally:
        serve.delete("auth")


def test_bad_checkpoints_report_unhealthy_naming_the_file_and_the_rest_keeps_serving(cluster, tmp_path):
    source = cluster.checkpoints["digits-s"].read_bytes()
    for name in ("ok", "missing", "truncated", "tampered"):
        (tmp_path / f"{name}.safetensors").write_bytes(source)
    write_manifest(tmp_path)
    app = build_app({"limits": LIMITS, "models": [model_args(f"digits-{n}", tmp_path / f"{n}.safetensors")
                                                  for n in ("ok", "missing", "truncated", "tampered")]})
    # Damaged after the config was validated, before the replicas load them.
    (tmp_path / "missing.safetensors").unlink()
    (tmp_path / "truncated.safetensors").write_bytes(source[:-100])
    tampered = bytearray(source)
    tampered[-1] ^= 0x01  # one bit of the last weight: still a valid safetensors file, only the checksum can tell
    (tmp_path / "tampered.safetensors").write_bytes(bytes(tampered))
    started = time.perf_counter()
    serve._run(app, name="bad", route_prefix="/bad", _blocking=False)
    expect = {"missing": "not found", "truncated": "truncated", "tampered": "does not match the manifest"}
    deadline = time.monotonic() + 240  # three replica starts each: 27 s on our two cores, over 90 s on a CI host
    while time.monotonic() < deadline:
        deployments = serve.status().applications["bad"].deployments
        failing = {n: deployments[model_deployment_name(f"digits-{n}")] for n in expect
                   if model_deployment_name(f"digits-{n}") in deployments}
        if len(failing) == 3 and all(d.status in ("UNHEALTHY", "DEPLOY_FAILED") and f"{n}.safetensors" in d.message
                                     for n, d in failing.items()):
            break
        time.sleep(0.5)
    reported_after = time.perf_counter() - started
    for n, d in failing.items():
        assert d.status in ("UNHEALTHY", "DEPLOY_FAILED") and f"{n}.safetensors" in d.message, (n, d)
        assert expect[n] in d.message, (n, d.message)
    ready = cluster.http.get("/bad/readyz")
    assert ready.status_code == 503
    models = ready.json()["models"]
    assert models["digits-ok"]["ready"]
    for n in expect:
        assert not models[f"digits-{n}"]["ready"] and f"{n}.safetensors" in models[f"digits-{n}"]["detail"]
    r = cluster.generate("/bad", model="digits-tampered", prompt="3")
    assert_openai_error(r, 503)
    assert "tampered.safetensors" in r.json()["error"]["message"]
    # The healthy model of the same app and the other apps keep serving.
    assert cluster.generate("/bad", model="digits-ok", prompt="3", num_inference_steps=2).status_code == 200
    assert cluster.generate(prompt="3", num_inference_steps=2).status_code == 200
    figure("bad_checkpoints", reported_unhealthy_after_s=round(reported_after, 1))
    serve.delete("bad")


# ---- faults -----------------------------------------------------------------------------------------------------
class Load:
    """Closed-loop clients sending seeded requests until stopped; every answer (or its absence) is recorded."""

    def __init__(self, base: str, prefix: str, model: str, clients: int, steps: int):
        self.codes: list[int] = []
        self.stop = threading.Event()
        body = {"model": model, "prompt": "5", "num_inference_steps": steps}

        def client(k: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as http:
                i = 0
                while not self.stop.is_set():
                    try:
                        r = http.post(f"{prefix}/v1/images/generations", json={**body, "seed": k * 100000 + i})
                        self.codes.append(r.status_code)
                        if r.status_code != 200:
                            assert_openai_error(r, (500, 503, 504))
                    except httpx.TimeoutException:
                        self.codes.append(0)
                    except httpx.HTTPError:
                        self.codes.append(-1)
                    i += 1
        self.threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in self.threads:
            t.start()

    def finish(self) -> dict[int, int]:
        self.stop.set()
        for t in self.threads:
            t.join(90)
        assert not any(t.is_alive() for t in self.threads), "a client is still waiting for an answer"
        return {c: self.codes.count(c) for c in sorted(set(self.codes))}


def chaos_state() -> tuple[str, int]:
    """The chaos model deployment's status and its number of RUNNING replicas, as Ray's controller sees them."""
    d = serve.status().applications["chaos"].deployments[model_deployment_name("digits-c")]
    return getattr(d.status, "value", d.status), d.replica_states.get("RUNNING", 0)


def test_killed_replica_is_replaced_and_every_request_is_answered_then_a_redeploy_drains(cluster):
    def args(default_steps: int) -> dict:
        return {"limits": {**LIMITS, "default_inference_steps": default_steps}, "models": [
            model_args("digits-c", cluster.checkpoints["digits-s"], autoscaling={"min_replicas": 2, "max_replicas": 2},
                       health_check_period_s=1)]}
    serve.run(build_app(args(8)), name="chaos", route_prefix="/chaos")
    deployment = model_deployment_name("digits-c")
    try:
        load = Load(cluster.base, "/chaos", "digits-c", clients=6, steps=40)
        time.sleep(1.0)
        replicas = replica_pids("chaos", deployment)
        assert len(replicas) == 2, replicas
        pid = min(replicas)
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        while time.perf_counter() - killed < 10 and chaos_state() == ("HEALTHY", 2):
            time.sleep(0.05)
        noticed_s = time.perf_counter() - killed
        while time.perf_counter() - killed < 150 and chaos_state() != ("HEALTHY", 2):  # 18.5 s on our two cores
            time.sleep(0.1)
        recovered_s = time.perf_counter() - killed
        time.sleep(1.0)
        codes = load.finish()
        figure("replica_killed", answers=codes, death_noticed_after_s=round(noticed_s, 2),
               healthy_again_after_s=round(recovered_s, 2),
               affected=sum(n for c, n in codes.items() if c != 200))
        assert noticed_s < 10 and chaos_state() == ("HEALTHY", 2)
        replaced = replica_pids("chaos", deployment)
        assert len(replaced) == 2 and pid not in replaced, (pid, replaced)  # a new process took the killed one's place
        assert set(codes) <= {200, 503}, codes  # images, or a clear 503 for those caught on the dead replica
        assert codes.get(200, 0) >= 10

        # Redeploy with a changed config while requests run: the old replicas finish theirs before they stop.
        load = Load(cluster.base, "/chaos", "digits-c", clients=6, steps=60)
        time.sleep(1.0)
        started = time.perf_counter()
        serve.run(build_app(args(9)), name="chaos", route_prefix="/chaos")
        redeployed_s = time.perf_counter() - started
        time.sleep(1.0)
        codes = load.finish()
        figure("redeploy", answers=codes, redeploy_s=round(redeployed_s, 2))
        assert codes and set(codes) == {200}, codes
        r = cluster.generate("/chaos", model="digits-c", prompt="5", stream=True)
        assert "\"num_steps\": 9" in r.text  # the new config serves
    finally:
        serve.delete("chaos")

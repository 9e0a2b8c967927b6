"""Past one machine: a Ray cluster of two nodes on this host, `serve deploy serve_config.yaml` on it, and the worker
node lost under load.

The head takes no replicas (``--num-cpus 0``); the worker node, joined with ``ray start --address``, has the CPUs.
Every node runs a Serve proxy; two on one host need two ports, so the worker's binds
``RAY_SERVE_WORKER_PROXY_HTTP_PORT`` (Ray Serve 2.60 reads it on non-head nodes). The config is the shipped one with
the test's port, absolute checkpoint paths and the gateway at ``num_cpus: 0`` taking a custom resource only the head
has (``gateway.resources``): the gateway (it only routes) runs on the head whatever node joins first and reaches the
model replicas on the worker across nodes, so that losing the worker leaves a gateway to answer 503. Figures print
as ``FIGURE`` lines (docs/serving.md)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from ray_nodes import GATEWAY_RESOURCE, TwoNodeCluster
from serve_helpers import free_port

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("digits-s", "digits-m")
DEADLINE_S = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]["limits"][
    "request_timeout_s"]


def figure(name: str, **values) -> None:
    print(f"\nFIGURE {name} {json.dumps(values)}", flush=True)


def two_node_config(cluster: TwoNodeCluster) -> Path:
    """serve_config.yaml for this cluster: the head proxy's port, absolute checkpoints, a gateway that fits the head."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = cluster.head_proxy_port
    args = config["applications"][0]["args"]
    args["gateway"]["num_cpus"] = 0
    args["gateway"]["resources"] = {GATEWAY_RESOURCE: 1}  # only the head has it
    for m in args["models"]:
        m["checkpoint"] = str(ROOT / m["checkpoint"])
    path = cluster.temp_dir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def app_running(cluster: TwoNodeCluster) -> bool:
    app = cluster.serve_details().get("applications", {}).get("dit", {})
    return app.get("status") == "RUNNING"


@pytest.fixture(scope="module")
def cluster():
    cluster = TwoNodeCluster()
    try:
        head_s = cluster.start_head()
        deployed = cluster.serve("deploy", str(two_node_config(cluster)))
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        worker_s = cluster.start_worker()
        ready_s = cluster._wait(lambda: app_running(cluster), 180, "the application")
        figure("two_node_start", head_s=round(head_s, 1), worker_joined_s=round(worker_s, 1),
               app_running_after_worker_s=round(ready_s, 1))
        yield cluster
    finally:
        cluster.shutdown()


def generate(port: int, timeout: float = 60, **body) -> httpx.Response:
    body = {"model": "digits-s", "prompt": "7", "num_inference_steps": 10, **body}
    return httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", json=body, timeout=timeout)


def placement(cluster: TwoNodeCluster) -> dict[str, list[tuple[str, str]]]:
    """Deployment -> (state, node id) of each replica."""
    deployments = cluster.serve_details()["applications"]["dit"]["deployments"]
    return {name: [(r["state"], r["node_id"]) for r in d["replicas"]] for name, d in deployments.items()}


def head_node_id(cluster: TwoNodeCluster) -> str:
    return cluster.serve_details()["controller_info"]["node_id"]  # the controller runs on the head


@pytest.mark.slow
def test_model_replicas_run_on_the_worker_and_both_proxies_serve_images(cluster):
    head = head_node_id(cluster)
    replicas = placement(cluster)
    for model in MODELS:
        nodes = {node for _, node in replicas[f"model-{model}"]}
        assert nodes and head not in nodes, f"{model} replicas on the head: {replicas}"
    assert [node for _, node in replicas["gateway"]] == [head]
    proxies = cluster.serve_details()["proxies"]
    assert len(proxies) == 2 and {p["status"] for p in proxies.values()} == {"HEALTHY"}
    for port in (cluster.head_proxy_port, cluster.worker_proxy_port):
        for model in MODELS:
            r = generate(port, model=model)
            assert r.status_code == 200, (port, r.text[:500])
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
            assert image.format == "PNG" and image.size[0] > 0


@pytest.mark.slow
def test_prometheus_scrapes_both_nodes_through_rays_service_discovery(cluster, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("the `prometheus` binary is missing: run `make sysdeps` (installs Debian's prometheus)")
    discovery = cluster.discovery_file()
    listed = {t for group in json.loads(discovery.read_text()) for t in group["targets"]}
    ports = {"head": cluster.head_ports.metrics_export, "worker": cluster.worker_ports.metrics_export}
    assert {int(t.rsplit(":", 1)[1]) for t in listed} >= set(ports.values()), listed
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: ray-cluster
    file_sd_configs: [{{files: ["{discovery}"], refresh_interval: 1s}}]
""")
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(promql: str) -> list[dict]:
            try:
                r = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": promql}, timeout=5)
                return r.json()["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                return []

        def instances(promql: str) -> set[int]:
            return {int(s["metric"]["instance"].rsplit(":", 1)[1]) for s in query(promql)}

        wanted = {  # what each node's own processes export, as Prometheus has it from that node's target
            "head": 'ray_node_cpu_count{RayNodeType="head"}',  # the head's raylet
            "worker": 'ray_node_cpu_count{RayNodeType="worker"}',
            "gateway": 'ray_dit_requests_total{model="digits-s"}',  # the gateway replica, on the head
            "engine": 'ray_dit_images_generated_total{model="digits-s"}',  # the model replica, on the worker
        }
        expected = {"head": ports["head"], "worker": ports["worker"], "gateway": ports["head"],
                    "engine": ports["worker"]}
        found: dict[str, set[int]] = {}
        started = time.monotonic()
        while time.monotonic() - started < 60:
            generate(cluster.head_proxy_port)
            up = instances("up == 1")
            found = {k: instances(q) for k, q in wanted.items()}
            if set(ports.values()) <= up and all(expected[k] in found[k] for k in wanted):
                break
            time.sleep(1)
        assert set(ports.values()) <= instances("up == 1"), query("up")
        for key, port in expected.items():
            assert port in found[key], f"{wanted[key]} not scraped from {port}: {found}"
        figure("two_node_prometheus", seconds_to_both_nodes=round(time.monotonic() - started, 1))
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Answer:
    sent: float  # time.monotonic()
    seconds: float
    status: int | str  # an HTTP status, or the exception's name
    retry_after: str | None


class Load:
    """Clients that send one request after another through the head's proxy, until stopped."""

    def __init__(self, port: int, clients: int = 4):
        self.port, self.answers, self.stop = port, [], threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:  # a hung request shows as a client timeout just past the deadline
                r = generate(self.port, timeout=DEADLINE_S + 15)
                status, retry_after = r.status_code, r.headers.get("retry-after")
            except httpx.HTTPError as e:
                status, retry_after = type(e).__name__, None
            self.answers.append(Answer(sent, time.monotonic() - sent, status, retry_after))
            if status != 200:
                time.sleep(0.2)  # as a client honouring Retry-After would, but quicker

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def first_200_sent_after(self, t: float) -> Answer | None:
        return next((a for a in sorted(self.answers, key=lambda a: a.sent) if a.sent > t and a.status == 200), None)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ray_stop", "hard_kill"])
def test_worker_lost_under_load_every_request_is_answered_and_replicas_come_back(cluster, how):
    """Every request gets 200, or 503 with Retry-After while no model replica runs, well inside its deadline; once
    the worker node is started again the replicas return to it and requests succeed."""
    with Load(cluster.head_proxy_port) as load:
        time.sleep(3)
        assert any(a.status == 200 for a in load.answers), "no image before the node was lost"
        lost = time.monotonic()
        cluster.worker.stop() if how == "ray_stop" else cluster.worker.kill()
        stopped_s = time.monotonic() - lost
        cluster._wait(lambda: any(a.status == 503 and a.sent > lost for a in load.answers), DEADLINE_S,
                      "a 503 while the worker node is gone")
        first_503_s = min(a.sent + a.seconds for a in load.answers if a.status == 503) - lost
        time.sleep(5)  # a few more seconds without a node for the models
        restarted = time.monotonic()
        joined_s = cluster.start_worker()
        cluster._wait(lambda: load.first_200_sent_after(restarted) is not None, 180, "a 200 after the restart")
        recovered = load.first_200_sent_after(restarted)
        time.sleep(2)
    answers = load.answers
    statuses = {a.status for a in answers}
    assert statuses <= {200, 503}, sorted(statuses, key=str)
    assert all(a.retry_after and int(a.retry_after) >= 1 for a in answers if a.status == 503)
    slowest = max(a.seconds for a in answers)
    assert slowest < DEADLINE_S / 4, f"a request took {slowest:.1f} s (deadline {DEADLINE_S} s)"
    head = head_node_id(cluster)

    def models_back_on_the_worker() -> bool:  # digits-m may still be loading when digits-s answers again
        replicas = placement(cluster)
        return all({state for state, _ in replicas[f"model-{m}"]} == {"RUNNING"} and
                   head not in {node for _, node in replicas[f"model-{m}"]} for m in MODELS)
    cluster._wait(models_back_on_the_worker, 60, f"every model replica RUNNING on the worker: {placement(cluster)}")
    assert generate(cluster.worker_proxy_port).status_code == 200  # the new worker's proxy serves too
    during = [a for a in answers if lost <= a.sent < restarted]
    figure(f"two_node_{how}", requests=len(answers), answered_200=sum(a.status == 200 for a in answers),
           answered_503=sum(a.status == 503 for a in answers), slowest_answer_s=round(slowest, 2),
           node_stopped_in_s=round(stopped_s, 1), first_503_after_loss_s=round(first_503_s, 1),
           slowest_answer_while_lost_s=round(max(a.seconds for a in during), 2) if during else None,
           worker_rejoined_s=round(joined_s, 1),
           recovery_s=round(recovered.sent + recovered.seconds - restarted, 1))

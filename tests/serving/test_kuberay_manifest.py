"""deploy/rayservice.yaml stays true: its embedded Serve config is serve_config.gpu.yaml with the differences its
comments name, and every field it sets exists, with the right type, in the RayService schema of the KubeRay version
it names (tests/serving/data: that CRD's openAPIV3Schema, its source in the file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "rayservice.yaml"
SCHEMA = Path(__file__).parent / "data" / "kuberay-v1.1.0-rayservice-schema.json"
IMAGE_ROOT = "/app/"  # where the image holds the checkpoints (Dockerfile: WORKDIR /app)
PYTHON_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list}


def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def schema() -> dict:
    return json.loads(SCHEMA.read_text())["openAPIV3Schema"]


def schema_problems(value, node: dict, path: str = "") -> list[str]:
    """Every field of ``value`` the OpenAPI v3 ``node`` does not have, or holds with another type, and every
    required field it lacks; a structural walk (properties, items, additionalProperties, the Kubernetes extensions)
    rather than a full validator."""
    if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
        return []
    if node.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: want an integer or a string, got {value!r}"]
    kind = node.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: want an integer, got {value!r}"]
    if kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: want a number, got {value!r}"]
    if kind in PYTHON_TYPES and not isinstance(value, PYTHON_TYPES[kind]):
        return [f"{path}: want {kind}, got {type(value).__name__} {value!r}"[:200]]
    if "enum" in node and value not in node["enum"]:
        return [f"{path}: {value!r} is not one of {node['enum']}"]
    problems = []
    if isinstance(value, list):
        for i, item in enumerate(value):
            problems += schema_problems(item, node.get("items", {}), f"{path}[{i}]")
    elif isinstance(value, dict):
        properties, extra = node.get("properties"), node.get("additionalProperties")
        problems += [f"{path}.{key}: required, missing" for key in node.get("required", []) if key not in value]
        for key, item in value.items():
            if properties is not None and key in properties:
                problems += schema_problems(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                problems += schema_problems(item, extra, f"{path}.{key}")
            elif properties is not None and not node.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{path}.{key}: no such field (the schema has {', '.join(sorted(properties))})"[:300])
    return problems


def test_manifest_names_the_kuberay_version_whose_schema_the_tests_carry():
    source = json.loads(SCHEMA.read_text())["source"]
    assert source["tag"] == "v1.1.0" and len(source["commit"]) == 40
    assert re.search(r"KubeRay operator v1\.1\.0 or later", MANIFEST.read_text())


def test_every_manifest_field_exists_in_the_rayservice_schema():
    m = manifest()
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService"
    assert schema_problems(m, schema()) == []


@pytest.mark.parametrize("change, problem", [
    (lambda m: m["spec"].update(serveConfigV3="x"), ".spec.serveConfigV3: no such field"),
    (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     ".spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus: want string"),
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas="4"),
     ".spec.rayClusterConfig.workerGroupSpecs[0].maxReplicas: want an integer"),
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),
     ".spec.rayClusterConfig.workerGroupSpecs[0].groupName: required, missing"),
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     .update(volumeMount=[]), "containers[0].volumeMount: no such field"),
])
def test_schema_walk_finds_a_misspelled_field_a_wrong_type_and_a_missing_required_one(change, problem):
    """The check above can fail: each change, one a user could make, is reported naming the field."""
    m = manifest()
    change(m)
    problems = schema_problems(m, schema())
    assert any(problem in p for p in problems), problems


def as_in_the_image(config: dict) -> dict:
    """serve_config.gpu.yaml as the manifest documents it: checkpoint and VAE paths under /app (baked into the
    image), the proxy on 0.0.0.0 inside the pod (the Serve service is a ClusterIP)."""
    def absolute(node):  # a new tree: YAML anchors share their nodes, which must change once each
        if isinstance(node, dict):
            return {k: IMAGE_ROOT + v if k in ("checkpoint", "vae") else absolute(v) for k, v in node.items()}
        return [absolute(item) for item in node] if isinstance(node, list) else node
    config = absolute(config)
    config["http_options"]["host"] = "0.0.0.0"
    return config


def test_embedded_serve_config_is_the_gpu_config_but_for_the_paths_and_host_it_documents():
    embedded = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    assert embedded == as_in_the_image(shipped)
    head = manifest()["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert head["metrics-export-port"] == "8080" and head["num-cpus"] == "0"  # no replicas on the head


def test_a_changed_gpu_config_is_noticed():
    embedded = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    shipped["applications"][0]["args"]["limits"]["max_inference_steps"] += 1
    assert embedded != as_in_the_image(shipped)

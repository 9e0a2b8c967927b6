"""``build_app(args)``: the typed app builder that serve_config.yaml's ``import_path`` names.

One deployment per model (its own autoscaling and Ray resources) behind one FastAPI gateway deployment:

    serve run serve_config.yaml                      # or, in Python:
    serve.run(build_app({"models": [{"name": "digits-s", "checkpoint": "checkpoints/digits-s.safetensors"}]}))
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from .config import AppArgs
from .gateway import Gateway
from .model_server import ModelServer

GATEWAY_NAME = "gateway"
GRACE_S = 10.0  # beyond the request deadline, for PNG encoding and the answer's trip back


def model_deployment_name(model: str) -> str:
    """The Ray Serve deployment name of a model (what `serve status` and the ``deployment`` metric tag show)."""
    return f"model-{model}"


def build_app(args: AppArgs) -> Application:
    """Validate ``args`` (a dict from YAML, or AppArgs) and bind the gateway over one deployment per model."""
    args = AppArgs.parse(args)
    models = {}
    for m in args.models:
        deployment = serve.deployment(ModelServer).options(
            name=model_deployment_name(m.name),
            ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            autoscaling_config=m.ray_autoscaling_config(),
            max_ongoing_requests=m.ongoing_requests_cap,
            max_queued_requests=m.max_queued_requests,
            graceful_shutdown_timeout_s=m.graceful_shutdown_timeout_s or args.limits.request_timeout_s + GRACE_S,
            health_check_period_s=m.health_check_period_s,
            health_check_timeout_s=m.health_check_timeout_s,
        )
        models[m.name] = deployment.bind(m, args.limits)
    gateway = serve.deployment(Gateway).options(
        name=GATEWAY_NAME,
        num_replicas=args.gateway.num_replicas,
        ray_actor_options={"num_cpus": args.gateway.num_cpus},
        max_ongoing_requests=args.gateway.max_ongoing_requests,
        graceful_shutdown_timeout_s=args.limits.request_timeout_s + GRACE_S,
    )
    return gateway.bind(args, models)

"""The typed app builders that serve_config.yaml's ``import_path`` names; each validates its ``args`` (AppArgs).

``build_app``: one application, one deployment per model (its own autoscaling and Ray resources) behind one FastAPI
gateway deployment that routes on the request's ``model``:

    serve run serve_config.yaml                      # or, in Python:
    serve.run(build_app({"models": [{"name": "digits-s", "checkpoint": "checkpoints/digits-s.safetensors"}]}))

``build_model_app`` + ``build_gateway_app``: one application per model, whose replicas serve the HTTP API
themselves at the model's route prefix (``/models/<name>/v1/images/generations``: one hop, the fast path), plus the
gateway as an application of its own for clients that keep one URL for every model. serve_config.gpu.yaml uses
these. Each model application must be named after its model; the gateway finds it by that name.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from .config import AppArgs, ModelArgs, model_deployment_name
from .gateway import Gateway
from .model_server import ModelIngress, ModelServer

__all__ = ["build_app", "build_gateway_app", "build_model_app", "model_deployment_name"]

GATEWAY_NAME = "gateway"
GRACE_S = 10.0  # beyond the request deadline, for PNG encoding and the answer's trip back


def _model_deployment(cls: type, m: ModelArgs, args: AppArgs):
    return serve.deployment(cls).options(
        name=model_deployment_name(m.name),
        ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        autoscaling_config=m.ray_autoscaling_config(),
        max_ongoing_requests=m.ongoing_requests_cap,
        max_queued_requests=m.max_queued_requests,
        graceful_shutdown_timeout_s=m.graceful_shutdown_timeout_s or args.limits.request_timeout_s + GRACE_S,
        health_check_period_s=m.health_check_period_s,
        health_check_timeout_s=m.health_check_timeout_s,
    )


def _gateway_deployment(args: AppArgs):
    return serve.deployment(serve.ingress()(Gateway)).options(
        name=GATEWAY_NAME,
        num_replicas=args.gateway.num_replicas,
        ray_actor_options={"num_cpus": args.gateway.num_cpus,
                           **({"resources": args.gateway.resources} if args.gateway.resources else {})},
        max_ongoing_requests=args.gateway.max_ongoing_requests,
        graceful_shutdown_timeout_s=args.limits.request_timeout_s + GRACE_S,
    )


def build_app(args: AppArgs) -> Application:
    """Validate ``args`` (a dict from YAML, or AppArgs) and bind the gateway over one deployment per model."""
    args = AppArgs.parse(args)
    models = {m.name: _model_deployment(ModelServer, m, args).bind(m, args.limits) for m in args.models}
    return _gateway_deployment(args).bind(args, models)


def build_model_app(args: AppArgs) -> Application:
    """One model whose replicas serve the HTTP API themselves; ``args.models`` holds exactly that model. Name the
    application after the model (``name: dit-10l``), so that ``build_gateway_app`` finds it."""
    args = AppArgs.parse(args)
    if len(args.models) != 1:
        raise ValueError(f"invalid serving config (the `args` of serve_config.yaml):\n  models: build_model_app "
                         f"serves exactly one model, got {len(args.models)} ({', '.join(m.name for m in args.models)})"
                         "; give each model an application of its own")
    m = args.models[0]
    return _model_deployment(serve.ingress()(ModelIngress), m, args).bind(m, args.limits, args.auth)


def build_gateway_app(args: AppArgs) -> Application:
    """The gateway alone, in front of models deployed by ``build_model_app`` as applications named after them.
    ``args.models`` lists them (the gateway sizes its admission caps from their entries)."""
    args = AppArgs.parse(args)
    return _gateway_deployment(args).bind(args, None)

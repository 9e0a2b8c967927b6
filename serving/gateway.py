"""The gateway: one HTTP API in front of every model deployment, routing on the request's ``model``.

It serves OpenAI's single-URL shape (``POST /v1/images/generations`` with ``model`` in the body) and holds no torch:
the process stays small. Each request costs one more hop than a model's own route (``app.build_model_app``): Ray's
handle call to the model replica. The API itself is ``frontend.Frontend``; the models are ``backend.RemoteModel``s.
"""

from __future__ import annotations

from ray.serve.handle import DeploymentHandle

from .backend import RemoteModel
from .config import AppArgs
from .frontend import Frontend


class Gateway:
    """Routes requests to the model deployments (wrapped with ``serve.ingress()`` in ``app``)."""

    def __init__(self, args: AppArgs, models: dict[str, DeploymentHandle] | None = None):
        """``models``: handles bound in the same application (``build_app``); None: models deployed as their own
        applications (``build_gateway_app``), found by name when first asked for."""
        models = models or {}
        backends = {m.name: RemoteModel(m.name, m.gateway_in_flight_cap(args.gateway.num_replicas), models.get(m.name))
                    for m in args.models}
        self.frontend = Frontend(backends, args.limits, args.auth)

    def __serve_build_asgi_app__(self):
        """Ray Serve calls this after ``__init__``: this replica's HTTP app (``serve.ingress()``, late-bound)."""
        return self.frontend.build_asgi_app()

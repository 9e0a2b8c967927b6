"""Prometheus metrics through Ray's metrics pipeline (``ray.serve.metrics``).

Names carry a ``dit_`` prefix and base units (seconds, ratios); our labels are ``model``, ``status``, and on the
feature cache's counter ``cache`` (the preset) and ``blocks`` (computed or skipped). Ray adds
``ray_`` in front of every custom metric name (``dit_request_latency_seconds`` is scraped as
``ray_dit_request_latency_seconds_bucket``) and its own process tags (``application``, ``deployment``, ``replica``,
``SessionName``, ``NodeAddress`` ...), and exports them on each node's metrics export port next to the
``ray_serve_*`` metrics (``ray start --metrics-export-port=8080``). docs/serving.md lists them all.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

# Seconds: from a 16x16 CPU model's few milliseconds to a long queue wait under overload.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0]
STEP_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
OCCUPANCY_BUCKETS = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
# Seconds: a collection of the few objects made since the last one, up to a full walk of a heap left unfrozen.
GC_PAUSE_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class GatewayMetrics:
    """What clients see: end-to-end latency and the count of requests by outcome (the HTTP status), recorded by
    whichever ingress answered (the gateway, or a model serving its own route)."""

    def __init__(self):
        self.latency = Histogram("dit_request_latency_seconds",
                                 "End-to-end latency of image requests at the API (gateway or model route)",
                                 boundaries=LATENCY_BUCKETS, tag_keys=("model", "status"))
        self.requests = Counter("dit_requests_total", "Image requests by model and HTTP status",
                                tag_keys=("model", "status"))

    def record(self, model: str, status: int, seconds: float) -> None:
        tags = {"model": model, "status": str(status)}
        self.latency.observe(seconds, tags=tags)
        self.requests.inc(tags=tags)


class EngineMetrics:
    """What one model replica's engine does: queue wait, denoising, steps, batch fill, load."""

    def __init__(self, model: str, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.queue_wait = Histogram("dit_queue_wait_seconds", "Time from submission to admission into the batch",
                                    boundaries=LATENCY_BUCKETS, tag_keys=("model",))
        self.denoise = Histogram("dit_denoise_seconds", "Time from admission to the last denoising step",
                                 boundaries=LATENCY_BUCKETS, tag_keys=("model",))
        self.step = Histogram("dit_step_seconds", "Duration of one batched denoising step",
                              boundaries=STEP_BUCKETS, tag_keys=("model",))
        self.occupancy = Histogram("dit_batch_occupancy_ratio", "Real rows / max_batch_size of each step",
                                   boundaries=OCCUPANCY_BUCKETS, tag_keys=("model",))
        self.images = Counter("dit_images_generated_total", "Images generated", tag_keys=("model",))
        self.running = Gauge("dit_requests_running", "Requests in the engine's batch", tag_keys=("model",))
        self.waiting = Gauge("dit_requests_waiting", "Requests waiting for a batch slot", tag_keys=("model",))
        self.wait_estimate = Gauge("dit_queue_wait_estimate_seconds", "The engine's estimated wait for a batch slot "
                                   "of a one-image request queued now (admission refuses past max_queue_wait_s)",
                                   tag_keys=("model",))
        # Rows x steps by the request's `cache` preset and whether the blocks ran or were forecast: the share
        # skipped is blocks="skipped" over both.
        self.block_rows = Counter("dit_block_row_steps_total", "Image rows per step that ran the DiT's blocks "
                                  "(blocks=computed) or forecast them from the feature cache (blocks=skipped)",
                                  tag_keys=("model", "cache", "blocks"))
        self.startup = Gauge("dit_replica_startup_seconds", "Where this replica's start went: before_init (Ray's "
                             "worker start and imports), verify, load, compile, capture, decoder, and total (all "
                             "but before_init)", tag_keys=("model", "phase"))
        self.gc_pause = Histogram("dit_gc_pause_seconds", "Garbage collections of generations 1 and 2 in the "
                                  "replica's process: every thread waits them out",
                                  boundaries=GC_PAUSE_BUCKETS, tag_keys=("model", "generation"))
        self.stalled = Counter("dit_stalled_seconds_total", "How late the replica's stall watch woke in the holds "
                               "it counts (STALL_MIN_S or more): every thread waiting on the GIL waited as long; a "
                               "lower bound", tag_keys=("model",))
        for metric in (self.queue_wait, self.denoise, self.step, self.occupancy, self.images, self.running,
                       self.waiting, self.block_rows, self.wait_estimate, self.startup, self.gc_pause, self.stalled):
            metric.set_default_tags({"model": model})  # a fresh dict: Ray adds its own tags to it

    def record_startup(self, startup) -> None:
        """This replica's start, by phase (a StartupTimes). Set again every second or so (ModelServer's refresher):
        Ray's export drops a gauge series not set for about half a minute."""
        for phase, seconds in startup.phases().items():
            self.startup.set(seconds, tags={"phase": phase})

    def on_step(self, stats) -> None:
        """The engine's per-step observer (runs on the engine thread): ``stats`` is a StepStats."""
        self.step.observe(stats.duration_seconds)
        self.occupancy.observe(stats.rows / self.max_batch_size)
        for cache, computed, skipped in stats.rows_by_cache:
            for blocks, rows in (("computed", computed), ("skipped", skipped)):
                if rows:
                    self.block_rows.inc(rows, tags={"cache": cache, "blocks": blocks})
        self.set_load(stats.running_requests, stats.waiting_requests)
        self.wait_estimate.set(stats.estimated_wait_seconds)

    def on_result(self, result) -> None:
        """Record a finished request (a GenerationResult)."""
        self.queue_wait.observe(result.queue_seconds)
        self.denoise.observe(result.denoise_seconds)
        self.images.inc(len(result.images))

    def record_collections(self, pauses) -> None:
        """Garbage collections timed by a ``CollectionTimer``, (end, generation, seconds) each: the older
        generations' (the youngest's are hundreds a second; a slow one is logged, not counted here)."""
        for _, generation, seconds in pauses:
            if generation > 0:
                self.gc_pause.observe(seconds, tags={"generation": str(generation)})

    def record_stalls(self, stalls) -> None:
        """Holds of the process's threads seen by a ``StallWatch``, (end, seconds) each."""
        held = sum(seconds for _, seconds in stalls)
        if held:
            self.stalled.inc(held)

    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

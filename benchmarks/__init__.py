"""Benchmarks: the harness behind every figure in docs/benchmarks.md, run from a checkout (not installed).

    python -m benchmarks engine ...      the engine on a GPU against diffusers (and against another checkout)
    python -m benchmarks serve ...       what serving adds to the engine, and the server under Poisson load
    python -m benchmarks load ...        open-loop Poisson load on a running server (the images API over HTTP)
    python -m benchmarks overload ...    capacity, then 3x capacity: shed cleanly, nothing fails or hangs
    python -m benchmarks soak ...        minutes at 80% of capacity: nothing fails, memory and p99 hold
    python -m benchmarks scale ...       one replica at 3x its capacity, the autoscaler's second, per phase (2 GPUs)
    python -m benchmarks startup ...     an engine's cold and warm start in fresh processes, with saved programs or not
    python -m benchmarks api ...         the HTTP API's own CPU time per request, in-process
    python -m benchmarks train-memory .. training memory and speed on a GPU next to dit-verify's estimate
    python -m benchmarks plot ...        serving benchmarks side by side: p99 and images/s against offered load
    python -m benchmarks cache-quality . feature caching's quality on the digit checkpoints, preset by preset (CPU)
    python -m benchmarks student-quality a few-step student against its teacher at 1-8 steps, on the digits (CPU)
    python -m benchmarks encode ...      the image encoders of each output_format on the same images (CPU)
    python -m benchmarks decode ...      a latent model's VAE decoder per image: diffusers' eager against ours
    python -m benchmarks anchor ...      diffusers' DiT + VAE + PNG in one process: images/s a served student must beat

``benchmarks/gpu/*.sh`` run them on a GPU host (the offline bundle installed first, results to $OUT).
"""

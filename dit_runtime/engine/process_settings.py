"""Process-wide settings for compiled engines, made by the entry points that build them, never by the library.

Inductor's cache directory and Dynamo's recompile limit belong to the whole process: an engine that changed them
as it was built would change them for every other engine and compile in the process. So the replica
(serving/model_server.py), the CLIs and the benchmarks call ``configure_compile`` before they build a compiled
engine, and the engine reads only its own config.
"""

from __future__ import annotations

import gc
import os
import time

import torch

from .types import EngineConfig


def configure_compile(config: EngineConfig, engines: int = 1) -> None:
    """Set up this process to compile ``engines`` engines of ``config`` (nothing when it does not compile):
    inductor's caches under its ``compile_cache_dir`` (the steps' and a compiled VAE decoder's), and room in Dynamo's
    recompile limit for their programs."""
    if config.compile_cache_dir and (config.compile or config.compile_decoder):
        use_compile_cache_dir(config.compile_cache_dir)
    if not config.compile:
        return
    # Up to one specialisation per bucket, counted per code object: every runner in this process compiles the same
    # step functions, so each engine needs its own allowance (past the limit, fullgraph=True fails hard).
    allow_recompiles(2 * len(config.buckets) * engines)


def allow_recompiles(count: int) -> None:
    """Raise Dynamo's recompile limit (per code object) by ``count``."""
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, getattr(dynamo, name) + count)


def use_compile_cache_dir(path: str) -> None:
    """Point inductor's caches (FX graphs, AOTAutograd, Triton kernels) of this process at ``path``.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it resolves a cache path, and writes its default there the
    first time anything asks (importing ``torch._dynamo.utils`` is enough). So the variable is set outright, not
    only when unset, and the in-memory caches that may hold paths under the old directory are cleared, as torch's
    own ``temporary_cache_dir`` does.
    """
    path = os.path.abspath(path)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") == path:
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:  # a torch without it: the variable alone
        return
    clear_caches()


def freeze_startup_heap() -> float:
    """Collect garbage once, then put every object the process holds so far (imports, models, compiled programs and
    their guards) out of the collector's reach (``gc.freeze``); returns the seconds it took.

    A full collection walks every tracked object. After torch.compile that is the startup heap many times over, and
    CPython runs one whenever enough new objects have outlived two collections: on a serving engine's thread, a
    step's host work stops for that long, at an unpredictable step. Frozen, the heap built at start-up is never walked
    again; what is allocated while serving is collected as before. The entry points call this once their engines are
    warm (the replica, the benchmarks), as vLLM's engine core does after its start-up.
    """
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start

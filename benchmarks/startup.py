"""An engine's start in fresh processes: with an empty compile cache, then warm, with saved programs and without.

    python -m benchmarks startup --out OUT --preset dit-10l --device cuda --precision fp16 --cuda-graphs \\
        --max-batch-size 64 --batch-buckets 16 64 --feature-cache-rows 0 --warm 2

Per mode (``programs``: the engine saves each compiled program whole and a warm start loads it, engine/programs.py;
``jit``: inductor's caches alone, so every start traces the step functions again), one process on an empty cache
directory of its own, then ``--warm`` processes on that directory, the modes interleaved so that a drifting host
weighs on both alike. Each process reports what a replica's start is made of: importing torch, building the engine
(compiling or loading its programs, capturing CUDA graphs, the rest), and a hash of one request's latents, the same
in every process or the row says so. A row goes to ``OUT/startup.jsonl`` as its process ends; a table at the end.

With ``--vae sd-random`` the model is a latent one with a VAE decoder of sd-vae-ft-ema's configuration (random
weights), compiled (``--decoder-graphs``: and captured as CUDA graphs) and warmed at every batch size up to
``--decode-batch-size``; its programs are saved and loaded as the steps' are, and each row has the decoder's seconds
and programs too. On the CPU (fp32, tiny latents so that the decodes themselves stay short):

    python -m benchmarks startup --out OUT --preset dit-tiny --device cpu --precision fp32 --max-batch-size 8 \
        --batch-buckets 8 --feature-cache-rows 0 --vae sd-random --decode-batch-size 8 --warm 1

Python's bytecode cache matters here: a host that ships its packages without bytecode and sets
PYTHONDONTWRITEBYTECODE (the H200 hosts these figures come from do) compiles every imported module from source in
every process, seconds of each start. ``--pycache DIR`` gives every process a bytecode cache there
(PYTHONPYCACHEPREFIX, with PYTHONDONTWRITEBYTECODE lifted), as a host with a normal install has one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("programs", "jit")


def child(a: argparse.Namespace) -> None:
    """One start: the engine built as a replica builds it, then one request."""
    started = time.perf_counter()
    import torch
    imported = time.perf_counter()
    from dit_runtime.engine import Engine, EngineConfig, GenerationRequest, configure_compile

    vae = None
    if a.vae == "sd-random":
        from .decode import SD_VAE_CONFIG, random_vae
        vae = random_vae(SD_VAE_CONFIG)
    config = EngineConfig(device=a.device, precision=a.precision, compile=True, cuda_graphs=a.cuda_graphs,
                          max_batch_size=a.max_batch_size,
                          batch_buckets=tuple(a.batch_buckets) if a.batch_buckets else None,
                          feature_cache_rows=a.feature_cache_rows, compile_cache_dir=a.cache_dir,
                          compile_programs=a.child == "programs", compile_decoder=vae is not None,
                          decoder_cuda_graphs=a.decoder_graphs, decode_batch_size=a.decode_batch_size)
    building = time.perf_counter()
    configure_compile(config)  # as the replica does, within the timed build
    engine = Engine.random_weights(a.preset, config, vae=vae)
    built = time.perf_counter() - building
    runner = engine.runner
    with engine:
        request = GenerationRequest.of(3, n=1, seed=5, num_inference_steps=10)
        result = engine.submit(request).result(timeout=600)
        latents = result.latents
    store = runner.store
    decoder = {}
    if vae is not None:
        saved = engine.decoder.store
        decoder = {"decoder_s": round(engine.decoder_warmup_seconds, 2),
                   "decoder_programs_loaded": saved.loaded if saved else None,
                   "decoder_programs_compiled": saved.compiled if saved else None,
                   "images_sha": hashlib.sha256(result.images.tobytes()).hexdigest()[:16]}
    print("ROW " + json.dumps({
        "mode": a.child, "torch": torch.__version__, "import_torch_s": round(imported - started, 2),
        "build_s": round(built, 2), "compile_s": round(runner.compile_seconds, 2),
        "capture_s": round(runner.capture_seconds, 2),
        "rest_s": round(built - runner.compile_seconds - runner.capture_seconds - engine.decoder_warmup_seconds, 2),
        "programs_loaded": store.loaded if store else None, "programs_compiled": store.compiled if store else None,
        "latents_sha": hashlib.sha256(latents.tobytes()).hexdigest()[:16], **decoder}), flush=True)


def start(a: argparse.Namespace, argv: list[str], mode: str, start_kind: str, cache_dir: Path) -> dict:
    env = dict(os.environ)
    if a.pycache:  # a bytecode cache, written even where the host says not to write one
        env["PYTHONPYCACHEPREFIX"] = str(a.pycache)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    began = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "benchmarks", "startup", *argv, "--child", mode, "--cache-dir",
                        str(cache_dir)], env=env, capture_output=True, text=True)
    rows = [json.loads(line[4:]) for line in p.stdout.splitlines() if line.startswith("ROW ")]
    row = rows[0] if rows else {"mode": mode, "error": p.stderr[-2000:]}
    return {"start": start_kind, **row, "process_s": round(time.perf_counter() - began, 2)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks startup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="dit-10l")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16", "fp8"])
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--batch-buckets", type=int, nargs="+")
    ap.add_argument("--feature-cache-rows", type=int, help="default: every row (the engine's default)")
    ap.add_argument("--vae", choices=["sd-random"], help="a latent model with this VAE decoder, compiled")
    ap.add_argument("--decoder-graphs", action="store_true", help="with --vae: the decoder captured as CUDA graphs")
    ap.add_argument("--decode-batch-size", type=int, default=64, help="with --vae: the largest batch it decodes")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--warm", type=int, default=2, help="warm starts per mode after its cold one")
    ap.add_argument("--pycache", type=Path, help="Python's bytecode cache for every process (PYTHONPYCACHEPREFIX)")
    ap.add_argument("--cache-root", type=Path, default=Path(tempfile.gettempdir()) / "dit-startup-bench",
                    help="each mode's compile cache directory goes here, emptied first")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / "startup.jsonl"
    meta = {"command": "python -m benchmarks startup " + " ".join(argv)}
    out.write_text(json.dumps(meta) + "\n")
    for mode in a.modes:
        shutil.rmtree(a.cache_root / mode, ignore_errors=True)
    rows = []
    for kind in ["cold"] + ["warm"] * a.warm:
        for mode in a.modes:
            row = start(a, argv, mode, kind, a.cache_root / mode)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| mode | start | process s | import torch s | engine build s | compile / load s | rest s | programs "
          "loaded / compiled | decoder s | its programs |\n" + "| --- " * 10 + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['start']} | failed: see {out} | | | | | | | |")
            continue
        programs = "" if r["programs_loaded"] is None else f"{r['programs_loaded']} / {r['programs_compiled']}"
        decoder = "" if r.get("decoder_programs_loaded") is None else \
            f"{r['decoder_programs_loaded']} / {r['decoder_programs_compiled']}"
        print(f"| {r['mode']} | {r['start']} | {r['process_s']} | {r['import_torch_s']} | {r['build_s']} | "
              f"{r['compile_s']} | {r['rest_s']} | {programs} | {r.get('decoder_s', '')} | {decoder} |")
    same = all(len({r.get(key) for r in rows}) == 1 for key in ("latents_sha", "images_sha"))
    print(f"\nthe same latents (and images) in every start: {same}")
    return 0 if same and all("error" not in r for r in rows) else 1

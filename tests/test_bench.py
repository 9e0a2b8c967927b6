"""The benchmarks' plumbing that runs without a GPU: two versions of the engine side by side, the steady steps of a
full batch timed through the engine's public API, and the decoder's setups held to one decode."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.engine import BASELINE_PACKAGE, EngineSteps, engine_request, load_baseline

import dit_runtime

REPO = Path(__file__).resolve().parents[1]


def test_another_checkout_runs_beside_this_one_and_its_steps_are_timed(tmp_path):
    shutil.copytree(REPO / "dit_runtime", tmp_path / "dit_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    baseline = load_baseline(str(tmp_path))
    try:
        from baseline_dit_runtime.engine import Engine, EngineConfig

        import dit_runtime.engine
        assert Engine is not dit_runtime.engine.Engine  # its own classes, from its own files
        assert Path(sys.modules["baseline_dit_runtime.engine.runner"].__file__).is_relative_to(tmp_path)
        engine = Engine.random_weights("dit-tiny", EngineConfig(max_batch_size=16)).start()
        try:
            seconds = EngineSteps("baseline", engine, rows=4)(steps=3)
            assert 0 < seconds < 5
            assert engine.stats().running_requests == 0  # left idle for the next setup
        finally:
            engine.stop()
    finally:
        for name in [n for n in sys.modules if n == BASELINE_PACKAGE or n.startswith(BASELINE_PACKAGE + ".")]:
            del sys.modules[name]
    assert baseline.__name__ == BASELINE_PACKAGE


def test_a_benchmark_request_is_one_unguided_image_of_the_asked_steps():
    request = engine_request(dit_runtime, 5, seed=3, steps=1000, sampler="ddim", guidance=1.0)
    assert request.class_ids == (5,) and request.rows == 1 and request.sampling.num_inference_steps == 1000


def test_serving_runs_plot_side_by_side(tmp_path):
    from PIL import Image

    from benchmarks.plots import main as plot

    for name, images in (("fp16", 141.2), ("fp8", 159.4)):
        (tmp_path / name).mkdir()
        load = [{"offered_rps": r, "images_per_s": min(r, images), "p99_ms": 200.0 * r / images} for r in (96, 160)]
        (tmp_path / name / "summary.json").write_text(json.dumps({"load": load}))
    out = tmp_path / "load.png"
    assert plot([str(tmp_path / "fp16" / "summary.json"), str(tmp_path / "fp8" / "summary.json"), "--out",
                 str(out)]) == 0
    assert Image.open(out).size == Image.open(tmp_path / "load-throughput.png").size == (860, 500)


def test_the_decode_benchmark_holds_each_setup_to_the_fp32_decode(tmp_path):
    pytest.importorskip("diffusers")
    from benchmarks.decode import main

    assert main(["--config", "tiny", "--latent-side", "8", "--batches", "1", "3", "--setups", "diffusers-eager",
                 "eager", "--rounds", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    assert [(r["setup"], r["batch"]) for r in rows] == [("diffusers-eager", 1), ("eager", 1),
                                                        ("diffusers-eager", 3), ("eager", 3)]
    for row in rows:
        assert row["image_shape"] == [3, 16, 16] and row["ms_per_image"] > 0
        assert row["rel_error"] < 1e-5 and row["max_uint8_diff"] <= 1  # fp32 on the CPU: the same decode


def test_the_decoders_flop_count_is_every_convolutions_own_arithmetic():
    """decode_flops (counted on the meta device) against each Conv2d's 2 * c_in * c_out * k_h * k_w * h_out * w_out
    (over groups), read off a real decode's module outputs."""
    pytest.importorskip("diffusers")
    from benchmarks.decode import TINY_VAE_CONFIG, decode_flops, random_vae

    vae = random_vae(TINY_VAE_CONFIG)
    expected = []
    def count(conv, _, out):
        k_h, k_w = conv.kernel_size
        expected.append(2 * conv.in_channels * conv.out_channels // conv.groups * k_h * k_w * out[0, 0].numel())
    hooks = [m.register_forward_hook(count) for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [vae.post_quant_conv.register_forward_hook(count)] if vae.post_quant_conv is not None else []
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 8, 8))
    for hook in hooks:
        hook.remove()
    total, convolutions = decode_flops(vae, (4, 8, 8))
    assert len(expected) > 5 and convolutions == sum(expected)
    assert total >= convolutions  # and the mid-block attention's matmuls


def test_the_decoders_kernels_are_filed_by_what_they_compute():
    from benchmarks.decode import CONVOLUTIONS, DECODER_KERNEL_KINDS
    from benchmarks.engine import kernel_kind

    kind = lambda name: kernel_kind(name, DECODER_KERNEL_KINDS)  # noqa: E731
    assert kind("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64") == CONVOLUTIONS
    assert kind("triton_tem_fused_convolution_0") == CONVOLUTIONS  # inductor's convolution template
    assert kind("triton_poi_fused_convolution_native_group_norm_silu_3") == "fused elementwise and reductions " \
                                                                            "(inductor)"  # named for what it fuses
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kind("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN") == "GEMM (cuBLAS, CUTLASS)"


def test_the_anchor_writes_one_decoded_png_per_image_and_times_each_stage(tmp_path):
    pytest.importorskip("diffusers")
    from benchmarks.anchor import main

    assert main(["--config", "tiny", "--batches", "3", "--rounds", "2", "--no-compile", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    row, = [json.loads(line) for line in (tmp_path / "anchor.jsonl").read_text().splitlines()]
    assert row["batch"] == 3 and row["image_shape"] == [16, 16]  # 8x8 latents through the tiny VAE's one upsampling
    assert row["images_per_s"] > 0 and all(row[k] > 0 for k in ("dit_ms", "decode_ms", "encode_ms"))
    assert row["png_bytes_mean"] > 0


def test_the_serve_benchmark_tells_the_stacks_processes_apart_by_command_line():
    from benchmarks.serve import process_role

    assert process_role(1, "ray::ServeReplica:dit-10l:ModelDeployment") == "replica dit-10l:ModelDeployment"
    assert process_role(1, "ray::SERVE_REPLICA::floor#Floor#x:ServeReplica:floor:Floor.__init__") == \
        "replica floor:Floor"
    assert process_role(1, "ray::ProxyActor") == "Ray proxy"
    assert process_role(1, "/usr/sbin/haproxy -f /tmp/haproxy.cfg") == "HAProxy"
    assert process_role(1, "python -m http.server") is None


def test_the_serve_benchmark_refuses_decoder_settings_without_a_decoder(tmp_path, capsys):
    from benchmarks.serve import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--decoder-graphs", "--decoder-compile-options", '{"max_autotune": true}'])
    assert "--decoder-graphs, --decoder-compile-options set how the VAE decoder runs: give --vae" in \
        capsys.readouterr().err


def test_a_requests_gpu_idle_time_splits_into_launch_latency_and_waiting_for_the_host():
    """Overlapping copies count once; a gap up to LAUNCH_GAP_US is launch latency, a longer one the host's."""
    from benchmarks.engine import LAUNCH_GAP_US, gpu_gaps

    kernels = [(0.0, 10.0), (12.0, 30.0), (20.0, 25.0), (30.0, 40.0), (40.0 + LAUNCH_GAP_US, 70.0),
               (170.0, 180.0)]
    gaps = gpu_gaps(list(reversed(kernels)))
    assert gaps["kernels"] == 6
    assert gaps["launch_gaps_ms"] * 1e3 == pytest.approx(2.0 + LAUNCH_GAP_US)
    assert gaps["host_gaps_ms"] * 1e3 == pytest.approx(100.0)


def test_the_cpu_profile_files_each_stack_under_its_innermost_known_frame_and_divides_by_requests(tmp_path):
    """py-spy's collapsed stacks (outermost frame first) as ``benchmarks serve --profile`` reads them."""
    from benchmarks.cpu_profile import SAMPLES_PER_S, ms_per_request, part_of

    loop = "Thread.run (threading.py:982);Engine._loop (dit_runtime/engine/engine.py:396)"
    step = f"{loop};ModelRunner._full (dit_runtime/engine/runner.py:318);ModelRunner._layout (dit_runtime/engine/" \
           "runner.py:258);ModelRunner._layout.<locals>.<listcomp> (dit_runtime/engine/runner.py:258)"
    encode = "ModelServer._answer (serving/model_server.py:240);encode_base64 (dit_runtime/images.py:150);" \
             "b64encode (base64.py:58)"
    asgi = "send_with_request_id (ray/serve/_private/http_util.py:737);RequestResponseCycle.send " \
           "(uvicorn/protocols/http/httptools_impl.py:522)"
    torch_frame = f"{step};Module._call_impl (torch/nn/modules/module.py:1789)"
    assert part_of(step) == "denoising step (eager)"
    assert part_of(f"{loop};Scheduler.schedule (dit_runtime/engine/scheduler.py:203)").startswith("engine")
    assert part_of(encode) == "base64" and part_of(encode.rpartition(";")[0]) == "image encoding"
    assert part_of(asgi).startswith("ASGI") and part_of(asgi.partition(";")[0]) == "Ray Serve"
    assert part_of(torch_frame) == "torch (its Python)" and part_of("<module> (mine.py:1)") == "other"
    path = tmp_path / "profile.txt"
    path.write_text(f"{step} 30\n{encode} 10\n{asgi} 20\n")
    parts = ms_per_request(path, requests=5)
    per_sample = 1000 / SAMPLES_PER_S / 5
    assert parts == {"denoising step (eager)": 30 * per_sample, "ASGI (FastAPI, Starlette, uvicorn)": 20 * per_sample,
                     "base64": 10 * per_sample}
    assert list(parts) == ["denoising step (eager)", "ASGI (FastAPI, Starlette, uvicorn)", "base64"]  # largest first


def test_the_kernel_profile_files_kernels_by_kind_whichever_library_named_them():
    from benchmarks.engine import kernel_kind

    assert kernel_kind("_fp8_gemm_gelu_quant_blocks_kernel") == "ours (Triton)"  # before the GEMMs' rule
    assert kernel_kind("_gelu_quant_rows_kernel") == "ours (Triton)"
    for gemm in ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128", "nvjet_tst_192x192_64x4_1x2_h_bz_TNT",
                 "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal>"):
        assert kernel_kind(gemm) == "GEMM (cuBLAS, CUTLASS)", gemm
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kernel_kind("triton_per_fused_add_native_layer_norm_0") == "fused elementwise and reductions (inductor)"
    assert kernel_kind("Memcpy DtoD (Device -> Device)") == "copies"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4>") == "other"


def test_a_kernel_profile_is_milliseconds_per_unit_by_kind_with_each_top_kernels_launches():
    from benchmarks.decode import DECODER_KERNEL_KINDS
    from benchmarks.engine import KernelTime, kernels_by_kind

    per_kernel = {"triton_red_fused_native_group_norm_3": KernelTime(us=3000.0, launches=12),
                  "sm90_xmma_fprop_implicit_gemm_f16f16": KernelTime(us=6000.0, launches=30),
                  "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": KernelTime(us=600.0, launches=6)}
    got = kernels_by_kind(per_kernel, count=3, unit="image", kinds=DECODER_KERNEL_KINDS, top=2)
    assert got["kernel_ms_per_image"] == 3.2
    assert list(got["kernel_ms_by_kind"].items()) == [("convolutions (cuDNN, inductor templates)", 2.0),
                                                      ("fused elementwise and reductions (inductor)", 1.0),
                                                      ("attention", 0.2)]
    assert got["top_kernels"] == [
        {"kernel": "sm90_xmma_fprop_implicit_gemm_f16f16", "ms_per_image": 2.0, "launches": 30},
        {"kernel": "triton_red_fused_native_group_norm_3", "ms_per_image": 1.0, "launches": 12}]


def test_the_soak_samples_memory_off_its_event_loop_and_reports_how_late_the_loop_woke():
    """A memory sample (psutil's scan of every process, nvidia-smi) taken on the client's event loop would delay every
    send and answer meanwhile: latency the server did not add."""
    from benchmarks import soak

    def slow_pids():  # a slow scan
        time.sleep(0.3)
        return set()

    async def run() -> soak.SoakReport:
        report, started = soak.SoakReport(1.0, 1.0, window_s=0.5), time.perf_counter()
        watchers = [asyncio.create_task(report.sample_replicas(slow_pids, started, 0.05)),
                    asyncio.create_task(report.watch_loop(started))]
        await asyncio.sleep(1.0)
        for watcher in watchers:
            watcher.cancel()
        report.wall_seconds = time.perf_counter() - started
        return report

    report = asyncio.run(run())
    assert len(report.samples) >= 2  # sampled all along
    assert max(late for _, late in report.loop_lag) < 0.2  # never held up by a 0.3 s sample
    assert [w["client_lag_max_ms"] is not None for w in report.windows()] == [True, True]


def test_a_paced_soak_offers_every_window_the_same_requests_and_poisson_does_not():
    """The soak's bar compares its last window's p99 with its first's: paced, each window is offered the same
    requests, so a difference is the server's; Poisson's windows draw their counts."""
    from benchmarks import loadgen

    def per_window(arrivals: str) -> list[int]:
        offsets = list(loadgen.send_offsets(60.0, 600.0, arrivals, seed=0))
        return [sum(k * 60 <= at < (k + 1) * 60 for at in offsets) for k in range(10)]

    assert per_window("paced") == [3600] * 10
    poisson = per_window("poisson")
    assert abs(sum(poisson) - 36000) < 4 * 36000 ** 0.5 and len(set(poisson)) > 1


def test_the_soak_reports_each_timed_span_per_window():
    from benchmarks import overload, soak

    report = soak.SoakReport(1.0, 1.0, window_s=10.0, wall_seconds=20.0)
    for k in range(100):
        o = overload.Outcome(200, 0.5 + k / 1000, queue_seconds=0.1, denoise_seconds=0.2, engine_seconds=0.3 + k / 1000,
                             server_seconds=0.4)
        report.outcomes.append((k / 10, o))  # the first 10 s: window 0
        report.outcomes.append((10 + k / 10, overload.Outcome(500, 0.01)))
    first, second = report.windows()
    assert (first["queue_p99_ms"], first["denoise_p99_ms"], first["server_p99_ms"]) == (100.0, 200.0, 400.0)
    assert first["engine_p99_ms"] == 398.0 and first["failed"] == 0  # nearest rank: the 99th of 100
    assert second["failed"] == 100 and second["engine_p99_ms"] is None


def test_the_soak_reports_the_cores_its_replicas_kept_busy_per_window():
    from benchmarks import soak

    report = soak.SoakReport(1.0, 1.0, window_s=10.0, wall_seconds=30.0)
    report.samples = [soak.ReplicaSample(at, 2**30, None, cpu, frozenset(pids)) for at, cpu, pids in
                      [(1.0, 10.0, {7}), (6.0, 15.0, {7}), (11.0, 20.0, {7}), (16.0, 30.0, {7}), (21.0, 50.0, {7}),
                       (26.0, 60.0, {8})]]
    # each window from the last sample before it: 1-6 s, 6-16 s; the last: a replica restarted, its CPU time not
    # comparable
    assert [w["replica_cpu_cores"] for w in report.windows()] == [1.0, 1.5, None]
    before = time.process_time()
    sample = soak.replica_sample(lambda: {os.getpid()}, 0.0)  # this process's CPU time, as the soak reads a replica's
    assert before - 0.02 <= sample.cpu_seconds <= time.process_time() + 0.02 and sample.pids == {os.getpid()}


def test_a_soaks_records_leave_the_collectors_reach_at_each_window():
    """A soak keeps every answer. Each window's end puts them out of the collector's reach with the frozen heap, so a
    collection during the soak walks one window's records at most, not ten minutes' (each a pause of the client's
    that the soak would charge to the server)."""
    import gc

    from benchmarks import overload, soak

    report = soak.SoakReport(1.0, 1.0, window_s=10.0)
    report.outcomes += [(k / 1000, overload.Outcome(200, 0.02)) for k in range(10_000)]
    mine = {id(o) for _, o in report.outcomes}
    assert sum(id(o) in mine for o in gc.get_objects()) == 10_000  # walked by every full collection
    try:
        report.window_ended(10.0, 10_000, 600.0)
        assert sum(id(o) in mine for o in gc.get_objects()) == 0
        assert gc.get_freeze_count() >= 10_000
    finally:
        gc.unfreeze()


def test_the_soak_reports_its_clients_own_collections_per_window():
    from benchmarks import soak

    report = soak.SoakReport(1.0, 1.0, window_s=10.0, wall_seconds=20.0, client_gc=[(3.0, 0.004), (15.0, 0.2)])
    assert [w["client_gc_max_ms"] for w in report.windows()] == [4.0, 200.0]
    assert report.summary()["client_gc_max_ms"] == 200.0


def test_the_soak_summary_puts_its_windows_on_the_servers_clock():
    """Window k starts at started_at + from_s, in this host's local time as Ray's logs write theirs: the time to look
    for in a replica's log (its slow collections)."""
    from benchmarks import soak

    from datetime import datetime

    report = soak.SoakReport(1.0, 1.0, window_s=10.0, wall_seconds=20.0, started_at=1_780_000_000.0)
    started = datetime.fromisoformat(report.summary()["started_at"])
    assert started.timestamp() == 1_780_000_000.0 and started.utcoffset() == datetime.now().astimezone().utcoffset()


def test_a_soak_raises_what_a_request_raised_in_the_client_rather_than_dropping_it():
    """The soak keeps only the tasks in flight; one that raised (a bug of the client's, not an HTTP failure, which
    one_request answers as an Outcome) must still fail the soak, not leave it one answer short without a word."""
    import httpx

    from benchmarks import soak

    class Client:  # answers 200 with no timings; its ``fail_at``-th request raises inside the client
        def __init__(self, fail_at: int | None):
            self.calls, self.fail_at = 0, fail_at

        async def post(self, *args, **kwargs) -> httpx.Response:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("a bug in the client")
            return httpx.Response(200, json={"timings": {}})

    def run(fail_at: int | None) -> soak.SoakReport:
        report = soak.SoakReport(20.0, 20.0, window_s=1.0)
        asyncio.run(soak._soak(report, Client(fail_at), {}, lambda: set(), time.perf_counter(), 0.5, 0.1, 5.0, 0))
        return report

    assert len(run(None).outcomes) == 10  # 20 a second for 0.5 s
    with pytest.raises(RuntimeError, match="a bug in the client"):
        run(4)


def test_client_pauses_time_each_collection_from_a_given_start():
    """The soak puts its client's collections in windows by these offsets."""
    import gc

    from benchmarks.loadgen import ClientPauses

    start = time.perf_counter()
    with ClientPauses() as pauses:
        time.sleep(0.05)
        gc.collect()
    ended, seconds = pauses.since(start)[-1]  # the collection called last (another thread's may come before)
    assert 0.05 <= ended <= time.perf_counter() - start and 0 <= seconds <= ended

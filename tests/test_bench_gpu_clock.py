"""The clock sampler that the engine benchmark runs beside every timing: nvidia-smi's lines, read back."""

from __future__ import annotations

import time
from datetime import datetime

from benchmarks.gpu_clock import GpuClock, parse_line, summarise


def _line(t: float, mhz: int, watts: float, temp: int, reasons: str) -> str:
    stamp = datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]  # nvidia-smi prints milliseconds
    return f"{stamp}, {mhz}, {watts}, {temp}, {reasons}\n"


def test_a_line_becomes_a_sample_on_the_time_time_clock():
    now = time.time()
    s = parse_line(_line(now, 1590, 594.83, 54, "0x0000000000000004"))
    assert abs(s.time - now) < 0.002
    assert (s.sm_mhz, s.power_w, s.temp_c, s.reasons) == (1590, 594.83, 54, 0x4)
    assert parse_line("timestamp, clocks.current.sm [MHz], power.draw [W]\n") is None  # a header
    assert parse_line("2026/11/29 02:07:36.576, [N/A], 79.1, 35, 0x0\n") is None


def test_a_window_reports_the_clock_and_why_the_driver_held_it_down():
    t = 1_800_000_000.0
    samples = [parse_line(_line(t + i * 0.05, mhz, w, 50, r)) for i, (mhz, w, r) in
               enumerate([(1980, 300.0, "0x0"), (1590, 595.0, "0x4"), (1575, 590.0, "0x4"), (1965, 400.0, "0x1")])]
    seen = summarise(samples[1:3])
    assert seen["sm_mhz_median"] == 1582.5 and seen["sm_mhz_min"] == 1575
    assert seen["power_w_max"] == 595.0 and seen["clock_reasons"] == ["sw_power_cap"] and seen["clock_samples"] == 2
    assert summarise(samples)["clock_reasons"] == ["sw_power_cap"]  # "idle" is not a reason a timing ran slow
    assert summarise([]) == {}


def test_without_nvidia_smi_the_sampler_records_nothing_and_closes(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with GpuClock(tmp_path / "smi.csv") as clock:
        assert not clock.running
        assert clock.window(0, time.time()) == {}
    assert (tmp_path / "smi.csv").read_text() == ""

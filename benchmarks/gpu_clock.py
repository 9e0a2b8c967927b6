"""What the GPU's clock was while a benchmark timed something: nvidia-smi sampled in the background.

An H200 under a sustained batch-256 load can drop its SM clock from 1,980 to about 1,590 MHz within half a second
under its power cap, and every kernel then runs about 20% longer. A figure without the clock it ran at
cannot be compared with another run's. ``GpuClock`` runs ``nvidia-smi --query-gpu ... -lms`` next to the benchmark,
keeps each sample with its time, and ``window(t0, t1)`` summarises the samples taken between two ``time.time()``
readings: the SM clock, the board power, the temperature and why the driver held the clock down, if it did.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# nvidia-smi's clocks_event_reasons bits (nvml's nvmlClocksEventReasons): why the clock is below its maximum.
REASONS = {0x1: "idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x10: "sync_boost",
           0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake", 0x100: "display_clocks"}
FIELDS = ("timestamp", "clocks.sm", "power.draw", "temperature.gpu", "clocks_event_reasons.active")
# drivers before 535 call the last field clocks_throttle_reasons.active
OLD_FIELDS = FIELDS[:-1] + ("clocks_throttle_reasons.active",)


@dataclass(frozen=True)
class Sample:
    time: float  # seconds since the epoch, as time.time()
    sm_mhz: float
    power_w: float
    temp_c: float
    reasons: int


def parse_line(line: str) -> Sample | None:
    """One line of ``--format=csv,noheader,nounits`` output, or None for anything else (a header, "[N/A]")."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(FIELDS):
        return None
    try:
        stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as time.time()
        return Sample(stamp, float(parts[1]), float(parts[2]), float(parts[3]), int(parts[4], 16))
    except ValueError:
        return None


def reason_names(bits: int) -> list[str]:
    return [name for bit, name in REASONS.items() if bits & bit] + ([f"0x{bits:x}"] if bits & ~sum(REASONS) else [])


def summarise(samples: list[Sample]) -> dict:
    """The clock fields a benchmark row carries for the samples taken while it was timed."""
    if not samples:
        return {}
    clocks = [s.sm_mhz for s in samples]
    reasons = 0
    for s in samples:
        reasons |= s.reasons
    return {"sm_mhz_median": statistics.median(clocks), "sm_mhz_min": min(clocks),
            "power_w_max": max(s.power_w for s in samples), "temp_c_max": max(s.temp_c for s in samples),
            "clock_reasons": reason_names(reasons & ~0x1), "clock_samples": len(samples)}


class GpuClock:
    """Samples GPU ``index`` every ``period_ms`` until ``close()``; a no-op where nvidia-smi is missing.

    Each raw line also goes to ``csv`` when given, so the whole trace is kept beside the results."""

    def __init__(self, csv: Path | None = None, period_ms: int = 50, index: int = 0):
        self.samples: list[Sample] = []
        self._proc = None
        self._csv = open(csv, "a") if csv is not None else None
        if shutil.which("nvidia-smi") is None:
            return
        for fields in (FIELDS, OLD_FIELDS):
            cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                   f"-lms={period_ms}", f"--id={index}"]
            # an unknown field makes nvidia-smi print an error and exit at once
            if subprocess.run(cmd[:3] + [f"--id={index}"], capture_output=True).returncode == 0:
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                              bufsize=1)
                break
        if self._proc is not None:
            self._thread = threading.Thread(target=self._read, name="gpu-clock", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._proc is not None

    def _read(self) -> None:
        for line in self._proc.stdout:
            if self._csv is not None:
                self._csv.write(line)
                self._csv.flush()
            sample = parse_line(line)
            if sample is not None:
                self.samples.append(sample)

    def window(self, t0: float, t1: float) -> dict:
        """The clock fields for the samples taken between ``t0`` and ``t1`` (``time.time()`` readings)."""
        if self._proc is not None:
            time.sleep(0.1)  # let the sample that closes the window arrive
        return summarise([s for s in list(self.samples) if t0 <= s.time <= t1])

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
            self._thread.join(timeout=5)  # it may still be writing the last line to the csv
            self._proc = None
        if self._csv is not None:
            self._csv.close()
            self._csv = None

    def __enter__(self) -> "GpuClock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

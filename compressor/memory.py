"""Process memory readings shared by the stages, the trainer and the benchmarks.

torch's CPU allocations bypass tracemalloc, so memory is read from the OS: /proc/self on Linux,
ru_maxrss elsewhere (a process-lifetime peak, the best available there).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections.abc import Callable
from typing import Self

import torch


def proc_status_mb(field: str, required: bool = False) -> float | None:
    """A `/proc/self/status` field in MiB (VmRSS, VmHWM, RssAnon, ...); None off Linux, or
    RuntimeError there when `required` (measurements that mean nothing without it)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        if required:
            raise RuntimeError(f"{field} needs /proc/self/status (Linux only)") from None
        return None
    raise KeyError(f"{field} is not a /proc/self/status field")


def max_rss_mb() -> float:
    """The process-lifetime peak RSS from getrusage (KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int:
    """Current resident set size in bytes (the peak so far off Linux)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return int(max_rss_mb() * 2**20)


class PeakMemory:
    """Peak memory above the starting point while the block runs, in MiB.

    CUDA: torch's allocator peak. CPU: `reader` (default: the process RSS, in bytes) sampled every
    5 ms by a thread, because the kernel's high-water mark cannot go down to show one stage's peak.
    """

    def __init__(self, device: torch.device | str, interval: float = 0.005,
                 reader: Callable[[], float] = rss_bytes) -> None:
        self.device, self.interval, self.reader, self.peak_mb = torch.device(device), interval, reader, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = self.reader()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self.reader())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self.reader())
        self.peak_mb = max(peak - self._start, 0) / 2**20

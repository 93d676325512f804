"""Peak memory of a process tree, sampled in a background thread.

An export runs in several processes (the coordinator, Ray's daemons, Ray workers, all
descendants of the coordinator when it starts Ray itself), so one process's ``ru_maxrss`` says
little. The sampler sums PSS (shared pages split between the processes that map them, so the
torch libraries loaded by every worker are not counted once per worker) over the tree at each
sample and keeps the maximum, plus the peak RSS of the root and of the largest other process.

Reading PSS walks the page tables of every mapping (``/proc/PID/smaps_rollup``) under the
process's mmap lock: ~60 ms a sample for `shardex verify` at 6.7B, which maps 27 GB of
checkpoint and shards. Sampled every 50 ms, that took most of a core of a 2-core machine from
the process measured, and held up its page faults: its wall time went from 33.0–34.5 s to
38.0–41.9 s (export, with nothing mapped, samples in ~1 ms). So the sampler waits at least
`OBSERVER_SHARE`⁻¹ × its last sample's duration between samples: it takes at most ~5 % of a
core, and a verification's memory, held for seconds per segment, is still seen.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import psutil

OBSERVER_SHARE = 0.05  # the most of one core that sampling may take from what it measures


@dataclasses.dataclass
class PeakMemory:
    total_pss_bytes: int = 0
    root_rss_bytes: int = 0
    max_child_rss_bytes: int = 0
    processes_seen: int = 0


class ProcessTreeSampler:
    """Context manager sampling the tree under `pid` (default: this process) every `interval` s,
    or less often where a sample is slow (`OBSERVER_SHARE`)."""

    def __init__(self, pid: int | None = None, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = PeakMemory()
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardex-memory", daemon=True)

    def __enter__(self) -> ProcessTreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            start = time.perf_counter()
            self.sample()
            wait = max(self.interval, (time.perf_counter() - start) / OBSERVER_SHARE)

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for process in processes:
            try:
                info = process.memory_full_info()
            except psutil.Error:  # exited between listing and reading
                continue
            total += info.pss
            self._seen.add(process.pid)
            if process.pid == self.root.pid:
                self.peak.root_rss_bytes = max(self.peak.root_rss_bytes, info.rss)
            else:
                self.peak.max_child_rss_bytes = max(self.peak.max_child_rss_bytes, info.rss)
        self.peak.total_pss_bytes = max(self.peak.total_pss_bytes, total)
        self.peak.processes_seen = len(self._seen)

"""System figures from psutil: per-core utilisation and per-process CPU and memory."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class ProcSample:
    slot: int
    cpu_percent: float  # of one core, as top shows it
    rss_bytes: int


class CoreSampler:
    """Per-core utilisation (percent) since the previous call, like btop's bars."""

    def __init__(self) -> None:
        self.cores = psutil.cpu_count(logical=True) or 1
        psutil.cpu_percent(percpu=True)  # primes the first interval

    def sample(self) -> list[float]:
        return list(psutil.cpu_percent(percpu=True))


class ProcSampler:
    """CPU% and RSS of the run's processes, by slot."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def watch(self, slot: int, pid: int) -> None:
        try:
            p = psutil.Process(pid)
            p.cpu_percent()  # primes
            self._procs[slot] = p
        except psutil.Error:
            pass

    def forget(self, slot: int) -> None:
        self._procs.pop(slot, None)

    def sample(self) -> list[ProcSample]:
        out = []
        for slot, p in list(self._procs.items()):
            try:
                with p.oneshot():
                    out.append(ProcSample(slot, p.cpu_percent(), p.memory_info().rss))
            except psutil.Error:
                self._procs.pop(slot, None)
        return out

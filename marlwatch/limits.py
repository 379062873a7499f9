"""What a run may ask of this machine, checked before anything starts.

Two rules, both lifted by `--ignore-limits`:

- **Processes per core.** Each worker is pinned to a core (the learner takes core 0); more than
  WORKERS_PER_CORE workers per core only queue for it, so the figures would measure the
  scheduler rather than the algorithm, while each worker still costs its own memory. Up to that
  many per core is allowed, so that oversubscription itself can be studied.
- **Memory.** Every process of the run (the learner and each worker) holds an interpreter, torch
  and an env (PROCESS_BYTES), plus what its settings make it allocate: networks with their
  training state, replay buffers, one update's activations (`Footprint`, estimated from the
  largest arrays in algorithms/configs.py, so it errs low). A run that needs more than the memory
  available now (psutil's estimate, or what the memory cgroup allows when that is lower) is refused: it
  would swap to a crawl or be killed by the kernel mid-run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil

PROCESS_BYTES = 150 * 2**20
"""Unique memory of one of the run's processes before its settings allocate anything: Python,
torch, the env, the telemetry (measured: a MADDPG worker after its first collect, 159 MB USS)."""
WORKERS_PER_CORE = 4


class LimitError(ValueError):
    """A run this machine cannot hold; the message is one line that says why and what to do."""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes that can be allocated now without swapping: psutil's estimate, or what this
    process's memory cgroup (a container, a systemd slice) still allows, whichever is lower."""
    free = psutil.virtual_memory().available
    room = _cgroup_room()
    return max(0, free if room is None else min(free, room))


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1), or None if it has no limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None  # not Linux
    root = Path("/sys/fs/cgroup")
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2: one hierarchy, mounted at the root or beside v1 as `unified`
            places = [(root / rel, "memory.max", "memory.current"), (root / "unified" / rel, "memory.max", "memory.current")]
        elif "memory" in controllers.split(","):
            places = [(root / "memory" / rel, "memory.limit_in_bytes", "memory.usage_in_bytes")]
        else:
            continue
        for folder, limit_file, usage_file in places:
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                    return int(limit) - int((folder / usage_file).read_text())
            except (OSError, ValueError):
                continue
    return None


def run_memory(config: Any, workers: int, iterations: int | None) -> tuple[int, str]:
    """(bytes, what dominates) that a run of this algorithm config needs, with `workers` workers,
    for `iterations` (None: until stopped)."""
    from algorithms.envs import env_sizes

    obs_dim, n_actions = env_sizes(config.env, config.agents)
    fp = config.footprint(obs_dim, n_actions, iterations)
    processes = (workers + 1) * PROCESS_BYTES
    settings = fp.learner + workers * fp.worker
    biggest = fp.biggest if settings > processes else f"{workers + 1} processes of {PROCESS_BYTES >> 20} MB each"
    return processes + settings, biggest


def check_machine(config: Any, workers: int, iterations: int | None) -> None:
    """Raise LimitError if this machine cannot run `config` with `workers` workers (see above)."""
    from marlwatch.report import human_bytes

    cores = usable_cores()
    if workers > WORKERS_PER_CORE * cores:
        raise LimitError(f"--workers {workers} is more than {WORKERS_PER_CORE} per core on {cores} "
                         f"core{'s' if cores > 1 else ''}: each worker is pinned to a core, and beyond that "
                         "they only queue for it (--ignore-limits runs it anyway)")
    need, biggest = run_memory(config, workers, iterations)
    free = available_memory()
    if need > free:
        why = f", mostly {biggest}" if biggest else ""
        raise LimitError(f"--agents {config.agents} --workers {workers}: the run would need at least "
                         f"{human_bytes(need)} of memory{why}; {human_bytes(free)} is available "
                         "(--ignore-limits runs it anyway)")

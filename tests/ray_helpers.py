"""For the Ray tests: which Ray processes exist, and the rows of a recording by process."""

from __future__ import annotations

import os
import time

import psutil
import pyarrow as pa
import pyarrow.compute as pc

# Ray's own processes (and the reaper marlwatch starts beside a local Ray instance).
_RAY_MARKERS = ("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private", "default_worker.py",
                "marlwatch-reaper")


def ray_processes() -> set[int]:
    found = set()
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        except psutil.Error:
            continue
        if p.pid != os.getpid() and any(m in text for m in _RAY_MARKERS):
            found.add(p.pid)
    return found


def left_behind(before: set[int], wait_s: float = 15.0) -> list[str]:
    """Ray processes started since `before` that are still there after `wait_s` s."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for pid in ray_processes() - before:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(p.cmdline())[:120])
            except psutil.Error:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def kill_left(before: set[int]) -> None:
    for pid in ray_processes() - before:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def table(path) -> pa.Table:
    with open(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all()


def span_slots(t: pa.Table) -> set[int]:
    spans = t.filter(pc.equal(t["kind"], "span"))
    return set(spans["proc"].to_pylist())


def events(t: pa.Table, name: str) -> list[dict]:
    import json

    ev = t.filter(pc.and_(pc.equal(t["kind"], "event"), pc.equal(t["name"], name)))
    return [{"proc": r["proc"], "t_ns": r["t_ns"], **json.loads(r["text"] or "{}")} for r in ev.to_pylist()]


def iterations_so_far(path) -> int:
    """The learner's iterations in a recording still being written (its complete batches)."""
    n = 0
    try:
        with open(path, "rb") as f:
            for batch in pa.ipc.open_stream(f):
                iters = batch.filter(pc.and_(pc.equal(batch["kind"], "iter"), pc.equal(batch["proc"], 0)))
                n += iters.num_rows
    except (OSError, pa.ArrowInvalid):
        pass
    return n


def wait_iterations(path, n: int, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while iterations_so_far(path) < n:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {n} iterations after {timeout} s")
        time.sleep(1)

"""Shared fixtures: fast settings for real runs, and a check that no child outlives a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
# Small batches and a short warm-up so a real MADDPG run updates within a few iterations.
FAST = ["--set", "warmup=256", "--set", "batch_size=64"]


def pytest_configure(config: pytest.Config) -> None:
    """Compile the checkout's bytecode once, before the xdist workers start, as `pip install` does
    for an installed package. Under PYTHONDONTWRITEBYTECODE (set on many CI machines) the hundreds
    of `python -m marlwatch` processes the tests start would otherwise each compile every module
    they import again. A checkout we may not write to is left as it is."""
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        import compileall

        for package in ("marlwatch", "algorithms", "tests"):
            compileall.compile_dir(REPO / package, quiet=2)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """What `-n auto` (addopts) starts: two workers a core, at most 16. A third of the suite's
    time is waiting rather than computing (processes starting, a run reaching the state a test
    wants, Ray, tmux, the app's timers), and a second test on each core fills it: on 2 cores the
    suite took 166 s with 4 workers against 215-233 s with 2."""
    from marlwatch.limits import usable_cores

    return min(2 * usable_cores(), 16)


def marlwatch(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "marlwatch", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)


@pytest.fixture(scope="session")
def maddpg_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real headless MADDPG run of today's code for the whole session (3 agents, 2 workers,
    40 iterations past a short warm-up): its recording and the finished command. Tests that only
    read a real run share it. Made once for all xdist workers (the first to ask makes it, under a
    lock, in the folder they share; pytest-xdist's own recipe), not once per worker."""
    import json

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # popen-gwN's parent: every worker's
    path, done = shared / "maddpg" / "maddpg.arrow", shared / "maddpg" / "command.json"
    with FileLock(str(shared / "maddpg.lock")):
        if not done.exists():
            path.parent.mkdir(exist_ok=True)
            proc = marlwatch("run", "--headless", "--algo", "maddpg", "--agents", "3", "--workers", "2",
                             "--iterations", "40", "--record", str(path), *FAST)
            done.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout,
                                        "stderr": proc.stderr}))
        proc = subprocess.CompletedProcess(**json.loads(done.read_text()))
    assert proc.returncode == 0, proc.stderr
    return path, proc


def real_run(tmp_path: Path, algo: str, agents: int, iterations: int, *settings: str):
    """A short real headless run of a built-in algorithm with one worker; its summary (Snapshot).

    Made by the command line's own code (`main`) in this process rather than in a new one: its
    learner and worker come from this test process's fork server, which imported torch once for
    every run the process makes (a new `marlwatch` process imports it again, ~1.5 s of CPU)."""
    from marlwatch.cli import main
    from marlwatch.metrics import summarize
    from marlwatch.recording import open_recording

    path = tmp_path / f"{algo}.arrow"
    code = main(["run", "--headless", "--algo", algo, "--agents", str(agents), "--workers", "1",
                 "--iterations", str(iterations), "--record", str(path),
                 *(a for kv in settings for a in ("--set", kv))])
    assert code == 0, f"marlwatch run exited {code} (its output is in the captured stdout/stderr)"
    return summarize(open_recording(path))


def _is_run_process(p: psutil.Process) -> bool:
    try:
        if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
            return False
        # multiprocessing's resource tracker and the fork server the built-in runs start their
        # processes from (marlwatch.forkserver) belong to the monitor and end with it, not with a
        # run. The processes forked from the server keep its command line: the server is the one
        # whose parent is not a fork server.
        cmdline = " ".join(p.cmdline())
        parent = p.parent()
        server = "multiprocessing.forkserver" in cmdline and \
            "multiprocessing.forkserver" not in " ".join(parent.cmdline() if parent is not None else [])
        return "resource_tracker" not in cmdline and not server
    except psutil.NoSuchProcess:
        return False


def descendants_alive(pid: int | None = None) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid or os.getpid()).children(recursive=True) if _is_run_process(p)]
    except psutil.NoSuchProcess:
        return []


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of a process group: a command started with `start_new_session=True` and
    everything it spawned (children stay in their parent's group)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


@pytest.fixture
def no_leftovers():
    before = {p.pid for p in descendants_alive()}
    yield
    left = [p for p in descendants_alive() if p.pid not in before]
    for p in left:
        p.kill()
    assert not left, f"processes left running: {[p.cmdline() for p in left]}"


async def wait_for(pilot, predicate, timeout: float, what: str, detail=None) -> None:
    """In a Pilot test: let the app run until `predicate()` holds, or fail after `timeout` s
    (with `detail()`, if given, in the message: what the app had seen by then)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f": {detail()}" if detail else ""))
        await pilot.pause(0.2)

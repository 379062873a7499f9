"""A run whose processes cannot all be created (a limit on processes, on open files): one line,
exit 1, a readable recording that says so, and no process left.

The limits are real ones set on the real command: the open-file limit (RLIMIT_NOFILE, which
binds any user: a pipe or a spawn then fails with EMFILE) and, as root, a pids cgroup (what
`ulimit -u` does for other users, which root is exempt from: fork fails with EAGAIN, the
BlockingIOError of the original report).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pytest

from marlwatch.recording import open_recording
from tests.conftest import REPO, group_members

pytestmark = pytest.mark.timeout(180)

PIDS_V1 = Path("/sys/fs/cgroup/pids")
# One thread per Arrow pool, so the monitor's own task count does not depend on the cores (the
# pids limit counts threads too); torch in the children is limited to one thread anyway.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ARROW_IO_THREADS": "1"}


def start_failing_run(tmp_path: Path, preexec, mode: str = "--headless") -> tuple[subprocess.CompletedProcess, Path,
                                                                                   list]:
    path = tmp_path / "limited.arrow"
    # 8 workers: the limits below give out part-way through starting them. --ignore-limits: on a
    # one-core machine 8 workers would be refused before any process is tried.
    proc = subprocess.Popen([sys.executable, "-m", "marlwatch", "run", mode, "--workers", "8", "--iterations",
                             "2", "--ignore-limits", "--set", "buffer_size=30000", "--record", str(path)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=150)
        # multiprocessing's resource tracker ends once it reads EOF from the monitor, just after.
        deadline = time.monotonic() + 5
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        left = group_members(proc.pid)
        for p in left:
            p.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), path, left


def check_failed_start(result: subprocess.CompletedProcess, path: Path, left: list, reason: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no start line either: the run never started
    assert lines[0].startswith("marlwatch: run failed: cannot start "), lines[0]
    assert reason in lines[0] and f"(recording kept: {path})" in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not left, f"processes left running: {left}"
    # The recording reads, is complete, and tells what happened.
    s = subprocess.run([sys.executable, "-m", "marlwatch", "summary", str(path), "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert s.returncode == 0, s.stderr
    assert json.loads(s.stdout)["status"] == "complete"
    table = open_recording(path).read_all()
    events = table.filter(pc.equal(table["kind"], "event"))
    failed = [json.loads(t) for n, t in zip(events["name"].to_pylist(), events["text"].to_pylist(), strict=True)
              if n == "start_failed"]
    assert len(failed) == 1 and failed[0]["error"] in lines[0], failed
    end = json.loads(table.filter(pc.equal(table["kind"], "end"))["text"][0].as_py())
    assert end["failure"] == failed[0]["error"] and end["stop_reason"] == "could not start", end


@pytest.mark.parametrize("mode", ["--headless", "--no-spans"])  # the latter: the live app (it fails before the app)
def test_too_few_open_files_to_start_every_process(tmp_path, mode):
    def few_files() -> None:
        # Enough for the monitor and its recording, not for 8 workers' pipes (about 5 each).
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    result, path, left = start_failing_run(tmp_path, few_files, mode)
    check_failed_start(result, path, left, "Too many open files (is the limit on open files, ulimit -n, reached?)")


@pytest.fixture
def pids_cgroup():
    """A pids cgroup of its own (cgroup v1, as root): a cap on the tasks of whatever enters it."""
    if os.geteuid() != 0 or not os.access(PIDS_V1, os.W_OK):
        pytest.skip("needs root and a writable cgroup v1 pids hierarchy (as another user, RLIMIT_NOFILE covers it)")
    group = PIDS_V1 / f"marlwatch-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    yield group
    deadline = time.monotonic() + 10
    while (group / "pids.current").read_text().strip() != "0" and time.monotonic() < deadline:
        time.sleep(0.1)
    group.rmdir()


def test_too_few_processes_allowed_to_start_every_process(tmp_path, pids_cgroup):
    # The monitor (main thread, one thread per Arrow pool) and the resource tracker fit; the
    # workers run into the cap part-way.
    (pids_cgroup / "pids.max").write_text("8")

    def enter() -> None:
        (pids_cgroup / "cgroup.procs").write_text(str(os.getpid()))

    result, path, left = start_failing_run(tmp_path, enter)
    check_failed_start(result, path, left, "Resource temporarily unavailable (is the limit on processes")
    # The resource tracker ends when the monitor does, a moment after it: wait for that, not longer.
    deadline = time.monotonic() + 10
    while (pids_cgroup / "pids.current").read_text().strip() != "0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (pids_cgroup / "pids.current").read_text().strip() == "0"

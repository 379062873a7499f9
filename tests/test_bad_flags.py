"""Bad flags and settings, through the real command: refused with one `marlwatch:` line and exit
2 before anything starts (no recording created, no process spawned, none left behind)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, group_members

pytestmark = pytest.mark.timeout(120)


def refused(tmp_path: Path, *args: str, code: int = 2, stdout: str | None = None, preexec=None) -> str:
    """Run `python -m marlwatch ARGS` in a session of its own ("{rec}" in ARGS is a recording path
    in an empty directory), its stdout into the file `stdout` if given; it must exit `code` with one
    `marlwatch:` line on stderr, write no file and leave no process of its session. Returns the line."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [a.replace("{rec}", str(out_dir / "x.arrow")) for a in args]
    with open(stdout or os.devnull, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "marlwatch", *argv], cwd=REPO,
                                stdout=out if stdout else subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=preexec)
    try:
        _, err = proc.communicate(timeout=100)
    finally:
        left = group_members(proc.pid)
        for p in left:  # whatever happened, nothing it started outlives the test
            p.kill()
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marlwatch: "), err
    assert not list(out_dir.iterdir()), "a file was created"
    assert not left, f"processes left running: {left}"
    return lines[0]


RUN = ["run", "--headless", "--workers", "1", "--iterations", "5", "--record", "{rec}"]


@pytest.mark.parametrize("args, expected", [
    (["--set", "batch_size=0"], "batch_size must be a whole number >= 1"),
    (["--set", "max_cycles=0"], "max_cycles must be a whole number >= 1"),
    (["--set", "buffer_size=0"], "buffer_size must be a whole number >= 1"),
    (["--set", "hidden=-5"], "hidden must be a whole number >= 1"),
    (["--set", "lr=nan"], "lr must be a finite number > 0"),
    (["--set", "gamma=inf"], "gamma must be a finite number from 0 to 1"),
    (["--set", "centralised_critic=maybe"], "centralised_critic must be true or false"),
    (["--set", "warmup=2000", "--set", "buffer_size=1000"], "warmup (2000) must be at most buffer_size (1000)"),
    (["--algo", "tom2c", "--set", "episodes_per_iteration=0"], "episodes_per_iteration must be a whole number >= 1"),
    (["--algo", "neurcomm", "--set", "optimizer=sgd"], "optimizer must be adam or rmsprop"),
    (["--set", "foo=1"], "unknown setting 'foo'"),
    (["--set", "workers=4"], "workers is set with --workers, not --set"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295, got -1"),
    (["--seed", str(2**32)], "--seed must be a whole number from 0 to 4294967295"),
    # Against the machine (marlwatch.limits): before the recording or any process exists.
    (["--agents", "1000"], "--agents 1000 --workers 1: the run would need at least"),
    (["--algo", "tom2c", "--agents", "1000"], "mostly one update's activations"),
    (["--workers", "1000"], "--workers 1000 is more than 4 per core"),
])
def test_bad_settings_are_refused_before_anything_starts(tmp_path, args, expected):
    assert expected in refused(tmp_path, *RUN, *args)


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full (a device that is always full)")


@needs_dev_full
def test_a_recording_that_cannot_be_written_fails_before_any_process_starts(tmp_path):
    assert "cannot write recording /dev/full" in refused(tmp_path, *RUN[:-1], "/dev/full")


SHIPPED = str(REPO / "recordings" / "maddpg-3agents-2workers.arrow")


@needs_dev_full
@pytest.mark.parametrize("args", [["summary", SHIPPED], ["summary", SHIPPED, "--json"], ["algorithms"],
                                  ["diff", SHIPPED, SHIPPED, "--resamples", "100"]])
def test_stdout_on_a_full_device_is_one_line_and_exit_1(tmp_path, args):
    line = refused(tmp_path, *args, code=1, stdout="/dev/full")
    assert line == "marlwatch: cannot write to standard output: No space left on device"


@needs_dev_full
def test_export_to_a_full_stdout_fails_as_a_failed_write(tmp_path):
    line = refused(tmp_path, "export", SHIPPED, "--to", "perfetto", "-o", "-", code=1, stdout="/dev/full")
    assert line == "marlwatch: export to - failed: No space left on device"


MEMORY_V1 = Path("/sys/fs/cgroup/memory")


def test_a_memory_cgroup_limit_is_the_memory_available(tmp_path):
    """In a container or a systemd slice the host's free memory is not ours: the cgroup's limit is."""
    if os.geteuid() != 0 or not os.access(MEMORY_V1, os.W_OK):
        pytest.skip("needs root and a writable cgroup v1 memory hierarchy")
    group = MEMORY_V1 / f"marlwatch-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(2 * 2**30))

        def enter() -> None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

        # A 6M-transition buffer (3 GB once full) fits the machine, not the group.
        line = refused(tmp_path, *RUN[:5], "100000", *RUN[6:], "--set", "buffer_size=6000000", preexec=enter)
        assert "mostly the replay buffer" in line, line
        free = re.search(r"; ([0-9.]+) (MB|GB) is available", line)
        assert free and (free[2] == "MB" or float(free[1]) <= 2.0), line
    finally:
        deadline = time.monotonic() + 10  # killed processes leave the group once they are reaped
        while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        group.rmdir()

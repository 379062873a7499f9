"""No file is ever lost: outputs are atomic and never replace what marlwatch did not create
(marlwatch/outputs.py), recordings are created exclusively with unique default names, and a
monitor killed at any moment leaves a readable file. Real files, symlinks, a FIFO, /dev/null,
pipes and real `python -m marlwatch` subprocesses."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest

from marlwatch.outputs import OutputError, atomic_output, numbered, write_text
from marlwatch.recording import SCHEMA, RecordingExists, RecordingWriter, RunInfo, open_recording
from marlwatch.sweep import new_folder
from tests.conftest import FAST, REPO, marlwatch

SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"
QUICK = ["--workers", "1", "--agents", "2", "--iterations", "3", *FAST]
# A run whose process does nothing: what a run writes, without training anything.
BRIEF = [sys.executable, "-c", "pass"]


def leftovers(d: Path) -> list[str]:
    """Temporary files an output left behind."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("marlwatch: ")
    return lines[0]


# -- the helper ------------------------------------------------------------------------------
def test_a_new_file_appears_only_once_written(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_output(target) as f:
        f.write("half")
        assert not target.exists()  # written beside it, under another name
        assert len(leftovers(tmp_path)) == 1
    assert target.read_text() == "half"
    assert leftovers(tmp_path) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("precious")
    target.chmod(0o640)
    with pytest.raises(RuntimeError), atomic_output(target) as f:
        f.write("partial")
        raise RuntimeError("disk full, say")
    assert target.read_text() == "precious"
    assert leftovers(tmp_path) == []
    write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # as `>` would keep it


def test_a_symlink_stays_a_symlink_and_its_file_is_replaced(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new"
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "not-yet.txt")
    write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "not-yet.txt").read_text() == "made"


def test_devices_and_fifos_are_written_straight_through(tmp_path):
    link = tmp_path / "null"
    link.symlink_to(os.devnull)
    for target in (Path(os.devnull), link):
        with pytest.raises(ValueError), atomic_output(target) as f:
            f.write("x")
            raise ValueError("fails: nothing may be removed")
        write_text(target, "discarded")
    assert link.is_symlink() and os.readlink(link) == os.devnull
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert leftovers(tmp_path) == []

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    with atomic_output(fifo, binary=True) as f:
        f.write(b"through the fifo")
    reader.join(10)
    assert got == [b"through the fifo"]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert leftovers(tmp_path) == []


def test_the_input_is_refused_under_any_name(tmp_path):
    src = tmp_path / "run.arrow"
    src.write_bytes(SHIPPED.read_bytes())
    (tmp_path / "link.arrow").symlink_to(src)
    os.link(src, tmp_path / "hard.arrow")
    for name in ("run.arrow", "link.arrow", "hard.arrow"):
        with pytest.raises(OutputError, match="it is the input"), atomic_output(tmp_path / name, inputs=[src]):
            raise AssertionError("never opened")
    assert src.read_bytes() == SHIPPED.read_bytes()
    with pytest.raises(OutputError, match="is a directory"), atomic_output(tmp_path):
        pass
    with pytest.raises(OutputError, match="No such file"), atomic_output(tmp_path / "no" / "x"):
        pass


def test_numbered_names():
    it = numbered("runs/a-1.arrow")
    assert [next(it) for _ in range(3)] == [Path("runs/a-1.arrow"), Path("runs/a-1-2.arrow"), Path("runs/a-1-3.arrow")]


# -- export, repair, flame: the commands ---------------------------------------------------------
def test_export_onto_its_input_is_refused_and_the_recording_survives(tmp_path):
    src = tmp_path / "run.arrow"
    src.write_bytes(SHIPPED.read_bytes())
    (tmp_path / "alias.json").symlink_to(src)
    for out in (src, tmp_path / "alias.json"):
        proc = marlwatch("export", str(src), "--to", "perfetto", "-o", str(out))
        assert proc.returncode == 2
        assert "it is the input" in one_line_error(proc)
        assert src.read_bytes() == SHIPPED.read_bytes()
    proc = marlwatch("repair", str(src), "-o", str(tmp_path / "alias.json"))
    assert proc.returncode == 2 and "it is the input" in one_line_error(proc)
    assert src.read_bytes() == SHIPPED.read_bytes()
    assert (tmp_path / "alias.json").is_symlink()


def test_a_failed_export_leaves_the_old_output_and_its_symlink(tmp_path):
    old = tmp_path / "trace.json"
    old.write_text("an earlier trace")
    link = tmp_path / "latest.json"
    link.symlink_to(old)
    cap = 200_000  # bytes: the trace is ~10 MB, the process may not write a file past this

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    proc = subprocess.run([sys.executable, "-m", "marlwatch", "export", str(SHIPPED), "--to", "perfetto", "-o",
                           str(link)], cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert proc.returncode == 1
    assert "failed: File too large" in one_line_error(proc)
    assert link.is_symlink() and old.read_text() == "an earlier trace"
    assert leftovers(tmp_path) == []

    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "spans.parquet").write_text("earlier spans")
    proc = subprocess.run([sys.executable, "-m", "marlwatch", "export", str(SHIPPED), "--to", "csv", "-o",
                           str(tables)], cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert proc.returncode == 1 and "failed: File too large" in one_line_error(proc)
    assert sorted(p.name for p in tables.iterdir()) == ["spans.parquet"]  # nothing half-written, nothing removed


def test_export_into_a_pipe_through_a_symlink_keeps_the_symlink(tmp_path):
    link = tmp_path / "out.json"
    link.symlink_to("/proc/self/fd/1")
    sh = f"{sys.executable} -m marlwatch export {SHIPPED} --to perfetto -o {link} | head -c 100"
    proc = subprocess.run(["bash", "-c", sh + "; echo \"rc=${PIPESTATUS[0]}\" >&2"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith('{"displayTimeUnit"') and len(proc.stdout) == 100
    assert proc.stderr.strip().splitlines()[-1] == "rc=0", proc.stderr  # `head` stopping early is no failure
    assert "Traceback" not in proc.stderr
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"

    # Read to the end, the pipe gets the whole trace.
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m marlwatch export {SHIPPED} --to perfetto -o {link}"
                           " | wc -c"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert int(proc.stdout) > 1_000_000 and link.is_symlink()


def test_repair_into_devnull_and_a_symlink_to_it(tmp_path):
    link = tmp_path / "null.arrow"
    link.symlink_to(os.devnull)
    for out in (os.devnull, str(link)):
        proc = marlwatch("repair", str(SHIPPED), "-o", out)
        assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == os.devnull
    assert leftovers(tmp_path) == []
    # A symlink to a regular file: the link stays, the file it names receives the repaired stream.
    real = tmp_path / "real.arrow"
    real.write_text("old")
    (tmp_path / "via.arrow").symlink_to(real)
    assert marlwatch("repair", str(SHIPPED), "-o", str(tmp_path / "via.arrow")).returncode == 0
    assert (tmp_path / "via.arrow").is_symlink() and open_recording(real).read_all().num_rows > 0


def _flame_recording(path: Path) -> None:
    info = RunInfo("maddpg", "simple_spread", 2, 1, 0, 1, procs={"0": "learner"})
    with RecordingWriter(path, info) as w:
        w.append(pa.RecordBatch.from_pylist(
            [{"kind": "span", "proc": 0, "name": "update", "t_ns": 0, "dur_ns": 10_000_000, "iter": 0},
             {"kind": "stack", "proc": 0, "name": "update", "t_ns": 1_000_000, "dur_ns": 30_000_000,
              "text": "main (train.py:1);update (algo.py:2)", "value": 3.0}], schema=SCHEMA))


def test_flame_outputs_are_atomic_and_never_the_input(tmp_path):
    rec = tmp_path / "flamed.arrow"
    _flame_recording(rec)
    before = rec.read_bytes()
    proc = marlwatch("flame", str(rec), "--phase", "update", "--to", "svg", "-o", str(rec))
    assert proc.returncode == 2 and "it is the input" in one_line_error(proc)
    assert rec.read_bytes() == before
    link = tmp_path / "null.svg"
    link.symlink_to(os.devnull)
    for out in (tmp_path / "f.svg", link):
        proc = marlwatch("flame", str(rec), "--phase", "update", "--to", "svg", "-o", str(out))
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "f.svg").read_text().startswith("<svg") and link.is_symlink()
    assert leftovers(tmp_path) == []


# -- recordings --------------------------------------------------------------------------------
INFO = RunInfo("maddpg", "simple_spread", 2, 1, 0, 3)


def test_a_recording_is_never_overwritten_unless_asked(tmp_path):
    path = tmp_path / "r.arrow"
    path.write_text("precious")
    with pytest.raises(RecordingExists):
        RecordingWriter(path, INFO)
    dangling = tmp_path / "dangling.arrow"
    dangling.symlink_to(tmp_path / "elsewhere.arrow")
    with pytest.raises(RecordingExists):
        RecordingWriter(dangling, INFO)
    assert path.read_text() == "precious" and not (tmp_path / "elsewhere.arrow").exists()
    with RecordingWriter(path, INFO, overwrite=True):
        pass
    assert open_recording(path).info.algo == "maddpg"
    # Unique: the next free name, and the writer says which.
    with RecordingWriter(path, INFO, unique=True) as w:
        assert w.path == tmp_path / "r-2.arrow"
    with RecordingWriter(os.devnull, INFO):  # a device: nothing there to lose
        pass


def test_run_refuses_an_existing_record_and_force_overwrites_it(tmp_path):
    path = tmp_path / "r.arrow"
    path.write_text("an earlier recording")
    t = time.monotonic()
    proc = marlwatch("run", "--headless", "--record", str(path), "--", *BRIEF)
    assert proc.returncode == 2
    assert one_line_error(proc) == (f"marlwatch: recording {path} exists already; not overwritten "
                                    "(--force overwrites it)")
    assert path.read_text() == "an earlier recording"
    assert time.monotonic() - t < 30  # refused before any process started
    proc = marlwatch("run", "--headless", "--record", str(path), "--force", "--", *BRIEF)
    assert proc.returncode == 0, proc.stderr
    rec = open_recording(path)
    list(rec.batches())
    assert rec.complete


def test_two_runs_started_together_get_a_file_each(tmp_path, no_leftovers):
    # The default name has one-second resolution: take every name of the coming minutes first, so
    # both runs must find a free one while racing each other for it.
    runs = tmp_path / "runs"
    runs.mkdir()
    now = time.time()
    stem = Path(sys.executable).name  # a command's recordings are named after it
    taken = {runs / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}.arrow"
             for s in range(-2, 240)}
    for p in taken:
        p.write_text("someone else's")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "marlwatch", "run", "--headless", "--", *BRIEF], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    named = []
    for _, err in outs:
        line = next(x for x in err.splitlines() if "recording to" in x)
        named.append(tmp_path / line.rsplit("recording to ", 1)[1])
    assert named[0] != named[1]
    assert all(p.read_text() == "someone else's" for p in taken)
    assert sorted(set(runs.iterdir()) - taken) == sorted(named)
    for p in named:
        assert p.name.endswith("-2.arrow") or p.name.endswith("-3.arrow")
        rec = open_recording(p)
        batches = list(rec.batches())
        assert rec.complete and batches


def test_a_monitor_killed_at_once_leaves_a_readable_file(tmp_path, no_leftovers):
    path = tmp_path / "killed.arrow"
    proc = subprocess.Popen([sys.executable, "-m", "marlwatch", "run", "--headless", *QUICK, "--iterations", "1000",
                             "--record", str(path)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not path.exists():  # SIGKILL the moment the file appears: before any child ran
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.001)
    children = psutil.Process(proc.pid).children(recursive=True)  # whatever it spawned by then
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert path.stat().st_size > 0
    table = pa.ipc.open_stream(path.read_bytes()).read_all()  # pyarrow alone reads it
    assert json.loads(table.schema.metadata[b"marlwatch.run"])["algo"] == "maddpg"
    s = marlwatch("summary", str(path))
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith(f"{path}  [truncated]")
    assert one_line_error(s) == (f"marlwatch: warning: {path} is truncated: it holds the run's settings but no "
                                 "rows (the monitor stopped before its first write)")
    j = marlwatch("summary", str(path), "--json")
    assert j.returncode == 0 and '"status": "truncated"' in j.stdout
    _, alive = psutil.wait_procs(children, timeout=30)  # they end with the monitor
    assert not alive


def test_a_sweep_never_reuses_a_folder(tmp_path):
    base = tmp_path / "sweep-x"
    assert new_folder(base) == base
    assert new_folder(base) == tmp_path / "sweep-x-2"
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "maddpg-a2-w1.arrow").write_text("an earlier cell")
    proc = marlwatch("sweep", "--algo", "maddpg", "--agents", "2", "--workers", "1", "--iterations", "2",
                     "--out", str(out))
    assert proc.returncode == 2 and "not overwritten" in one_line_error(proc)
    assert (out / "maddpg-a2-w1.arrow").read_text() == "an earlier cell"

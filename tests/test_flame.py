"""py-spy flame graphs tied to phases: a real run profiled with real py-spy."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from marlwatch.cli import main
from marlwatch.flame.align import attribute
from marlwatch.flame.auto import AutoTrigger
from marlwatch.flame.controller import FlameController
from marlwatch.flame.pyspy import Samples, pyspy_command, samples_from_chrometrace
from marlwatch.metrics import summarize
from marlwatch.recording import SCHEMA, open_recording
from marlwatch.runner import Run
from tests.conftest import REPO
from tests.scripted_run import scripted_run

# One worker runs the module, so its real run (`flamed`, ~12 s) is made once, not once per xdist worker.
pytestmark = [pytest.mark.timeout(180), pytest.mark.xdist_group("flame")]
SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"
FLAMED = REPO / "recordings" / "maddpg-flame.arrow"  # with py-spy samples; a warm-up until 28 s
QUICK = {"warmup": "512", "batch_size": "256"}


def maddpg_line(stack: str) -> int | None:
    """The line of algorithms/maddpg.py the learner's update was at (the deepest such frame)."""
    for frame in reversed(stack.split(";")):
        if frame.startswith("MADDPGLearner.update (") and "maddpg.py:" in frame:
            return int(frame.rsplit(":", 1)[1].rstrip(")"))
    return None


@pytest.fixture(scope="module")
def flamed(tmp_path_factory) -> Path:
    """`marlwatch run --headless --flame update:3` as the README has it, with a shorter warm-up
    (5,000 transitions: ~50 iterations, a few seconds; the default is ~250) and a second request.
    `update` runs from the first iteration but does real work only after the warm-up: its
    capture must wait for that, while `sample` is profiled at once."""
    rec = tmp_path_factory.mktemp("flame") / "flame.arrow"
    # No iteration limit: the run goes on until both captures are stored, however loaded the machine.
    proc = subprocess.Popen(
        [sys.executable, "-m", "marlwatch", "run", "--headless", "--algo", "maddpg", "--agents", "3", "--workers", "1",
         "--iterations", "100000", "--set", "warmup=5000", "--flame", "update:3",
         "--flame", "sample:2", "--latency-bound", "1000", "--record", str(rec)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    stored = 0
    for line in proc.stderr:  # type: ignore[union-attr]
        err_lines.append(line)
        if "samples stored" in line:
            stored += 1
            if stored == 2:
                proc.send_signal(signal.SIGINT)
        if "could not profile" in line or "run ended before" in line:
            proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    stderr = "".join(err_lines)
    assert proc.returncode == 130, stderr[-1500:]
    # Two requests, one after the other, each on the processes that run the phase; `update`
    # after saying that it waits for real work (the warm-up).
    assert "marlwatch: flame: waiting for 'update' to do real work before profiling it (update: " in stderr
    assert "marlwatch: flame: profiling 'update' in learner for 3 s at 100 Hz (it does real work now; waited " \
        in stderr
    assert "marlwatch: flame: profiling 'sample' in worker 1 for 2 s at 100 Hz" in stderr
    assert stored == 2, stderr[-1500:]
    assert "latency-bounded IPS" in out  # --latency-bound shown in the run's summary
    return rec


def test_flame_run_stores_samples_attributed_to_open_spans(flamed):
    table = open_recording(flamed).read_all()
    stacks = table.filter(pc.equal(table["kind"], "stack")).to_pylist()
    spans = table.filter(pc.equal(table["kind"], "span")).to_pylist()
    learner = [r for r in stacks if r["proc"] == 0]
    assert sum(r["value"] for r in learner) >= 100  # ~3 s at 100 Hz
    assert {r["proc"] for r in stacks} == {0, 1}  # the learner for update, the worker for sample
    # Every stored sample lies inside a span of its phase, in its process, that was open then.
    by_key: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for s in spans:
        by_key.setdefault((s["proc"], s["name"]), []).append((s["t_ns"], s["t_ns"] + s["dur_ns"]))
    for r in stacks:
        assert any(a <= r["t_ns"] and r["t_ns"] + r["dur_ns"] - 10_000_000 < b
                   for a, b in by_key[(r["proc"], r["name"])]), r
    # The clock alignment is right. Independent evidence: the stack itself. A sample whose stack
    # is inside the learner's update() must be attributed to `update` or a phase below it, and
    # one attributed there must be inside update() (py-spy stamps samples to ~1 ms, so phases of
    # ~1 ms such as update/critic at this batch size are attributed approximately: docs/flame.md).
    in_code = Counter()
    in_phase = Counter()
    for r in stacks:
        code = maddpg_line(r["text"]) is not None
        phase = r["name"] == "update" or r["name"].startswith("update/")
        if code:
            in_code[phase] += r["value"]
        if phase:
            in_phase[code] += r["value"]
    # Both ways, on a real run: update's own code was seen and stored under update. How well a
    # loaded machine's py-spy stamps line up is not asserted here (it varies with the load,
    # docs/flame.md "Accuracy"); the alignment itself is checked on known data below.
    assert in_code[True] >= 20 and in_phase[True] >= 20, (in_code, in_phase)
    done = {d["phase"]: d for d in events(table, "flame_done")}
    assert set(done) == {"update", "sample"}
    for phase, slot in (("update", "0"), ("sample", "1")):
        alignment = done[phase]["alignment"][slot]
        assert -50 <= alignment["shift_ms"] <= 400 and 0 <= alignment["agreement"] <= 1, alignment


def events(table, name: str) -> list[dict]:
    return [{"t_ns": t, **json.loads(x)} for n, t, x in zip(*(table[c].to_pylist() for c in ("name", "t_ns", "text")),
                                                            strict=True) if n == name]


def test_update_capture_waited_for_the_end_of_the_warm_up(flamed):
    # The request for `update` was there from the start; py-spy started only once update did
    # real work: after the learner's first gradient step (update/critic), not during the warm-up,
    # where `update` only stores transitions. `sample` did not wait for it.
    table = open_recording(flamed).read_all()
    spans = table.filter(pc.equal(table["kind"], "span"))
    first_step = min(t for n, t in zip(spans["name"].to_pylist(), spans["t_ns"].to_pylist(), strict=True)
                     if n == "update/critic")
    first_store = min(t for n, t in zip(spans["name"].to_pylist(), spans["t_ns"].to_pylist(), strict=True)
                      if n == "update/store")
    started = {d["phase"]: d["t_ns"] for d in events(table, "flame_started")}
    assert started["update"] > first_step > first_store, (started, first_step, first_store)
    assert started["sample"] < first_step
    # What it stored is update's own work: most of update's samples fell in the phases of a
    # gradient step, which the warm-up does not run (it only stores transitions). Counted by the
    # phase each sample was attributed to, not by the code in its stack: how much of a step a
    # loaded machine's py-spy sees in backward() varied with the load (27% to 60%).
    stacks = table.filter(pc.equal(table["kind"], "stack")).to_pylist()
    upd = Counter()
    for r in stacks:
        if r["name"] == "update" or r["name"].startswith("update/"):
            upd[r["name"]] += r["value"]
    stepping = sum(n for name, n in upd.items() if name not in ("update", "update/store"))
    assert stepping >= 0.5 * sum(upd.values()), upd


def test_flame_text_lists_update_code_not_rollout(flamed, capsys):
    assert main(["flame", str(flamed), "--phase", "update", "--to", "text", "--top", "60"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("phase update: ")
    assert "MADDPGLearner.update" in out
    # update's own code: the backward pass (a third of update's samples). Not the optimiser: under
    # load py-spy took 86 samples instead of 300 in the 3 s capture, and none in torch.optim (~8%).
    assert "backward" in out, out
    for rollout in ("MADDPGRollout", "collect", "env_step", "ParallelEnvRunner", "serve_rollout"):
        assert rollout not in out
    # And the other way round: the workers' `sample` is rollout code, not the update.
    assert main(["flame", str(flamed), "--phase", "sample", "--to", "text", "--top", "60"]) == 0
    out = capsys.readouterr().out
    assert "collect" in out and "MADDPGLearner" not in out and "backward" not in out
    # Metrics carries the same samples (live panel, replay at their time): top leaf functions.
    snap = summarize(open_recording(flamed))
    top = snap.top_functions("update", 50)
    assert top and sum(n for _, n in top) == sum(snap.stacks[p][f] for p in snap.stacks if p.startswith("update")
                                                 for f in snap.stacks[p])
    assert not snap.top_functions("sample/nothing")


def svg_frames(path: Path) -> list[str]:
    """The frame of each box of a flame graph SVG (its hover title, without the sample count)."""
    return [m.group(1) for m in re.finditer(r"<title>(.*?): \d+ samples", path.read_text())]


def test_flame_svg_and_speedscope(flamed, tmp_path, capsys):
    svg = tmp_path / "f.svg"
    assert main(["flame", str(flamed), "--phase", "update", "--to", "svg", "-o", str(svg)]) == 0
    text = svg.read_text()
    assert text.startswith("<svg") and "MADDPGLearner.update" in text and text.rstrip().endswith("</svg>")
    # By default one box per function at a given depth: update()'s samples on its many lines
    # (critic, actor, target: each a `with span` block) make one MADDPGLearner.update box,
    # named as py-spy names frames without line numbers.
    merged = [f for f in svg_frames(svg) if f.startswith("MADDPGLearner.update (")]
    assert len(merged) == 1 and merged[0].endswith("algorithms/maddpg.py)"), merged
    # --lines: a box per source line, as py-spy's own default.
    lines_svg = tmp_path / "lines.svg"
    assert main(["flame", str(flamed), "--phase", "update", "--to", "svg", "--lines", "-o", str(lines_svg)]) == 0
    per_line = [f for f in svg_frames(lines_svg) if f.startswith("MADDPGLearner.update (")]
    assert len(per_line) >= 2 and all(re_line(f) for f in per_line), per_line
    capsys.readouterr()
    ss = tmp_path / "f.speedscope.json"
    assert main(["flame", str(flamed), "--phase", "update", "--to", "speedscope", "-o", str(ss)]) == 0
    doc = json.loads(ss.read_text())
    assert doc["profiles"][0]["type"] == "sampled" and doc["profiles"][0]["name"] == "learner: update"
    frames = doc["shared"]["frames"]
    assert all(0 <= i < len(frames) for s in doc["profiles"][0]["samples"] for i in s)
    assert len(doc["profiles"][0]["samples"]) == len(doc["profiles"][0]["weights"])
    # Functions by default here too: no frame has a line.
    assert not any("line" in f for f in frames) and any(f["name"] == "MADDPGLearner.update" for f in frames)


def re_line(frame: str) -> bool:
    """`f (x.py:12)`: the frame names a source line."""
    return frame.endswith(")") and frame.rsplit(":", 1)[-1].rstrip(")").isdigit()


def test_perfetto_export_carries_the_samples(flamed, tmp_path):
    out = tmp_path / "t.json"
    assert main(["export", str(flamed), "--to", "perfetto", "-o", str(out)]) == 0
    events = json.loads(out.read_text())["traceEvents"]
    py = [e for e in events if e.get("cat") == "py-spy"]
    assert py and all(e["ph"] == "X" and e["tid"] == 2 and e["args"]["phase"].startswith(("update", "sync", "sample"))
                      for e in py)
    for pid in {e["pid"] for e in py}:
        track = [e for e in py if e["pid"] == pid]
        assert [e["ts"] for e in track] == sorted(e["ts"] for e in track)
        # Slices of one track do not overlap.
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-6 for a, b in zip(track, track[1:], strict=False))


def test_flame_bad_input(flamed, tmp_path, capsys):
    assert main(["flame", str(SHIPPED), "--phase", "update"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no py-spy samples: it was recorded without --flame or --auto-flame" in err[0]
    # Samples, none in the phase: what was captured, and a phase to try (not the same command again).
    assert main(["flame", str(flamed), "--phase", "sample/nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"marlwatch: {flamed}: no py-spy samples were taken while 'sample/nothing' ran; "
                             "the file's "), err
    assert "(py-spy ran for 'update', 'sample')" in err[0] or "(py-spy ran for 'sample', 'update')" in err[0], err
    assert err[0].endswith("; try --phase sample") and "marlwatch run" not in err[0], err
    assert main(["flame", str(flamed), "--phase", "update", "-o", "/proc/nope/x.txt"]) == 2
    assert capsys.readouterr().err.startswith("marlwatch: cannot write /proc/nope/x.txt")
    assert main(["flame", str(flamed), "--phase", "update", "--top", "0"]) == 2
    assert "--top must be at least 1" in capsys.readouterr().err
    assert main(["run", "--headless", "--flame", ":3"]) == 2
    assert "argument --flame: expected PHASE[:SECONDS], got ':3'" in capsys.readouterr().err
    assert main(["run", "--headless", "--flame", "update:soon"]) == 2
    assert "seconds must be a number" in capsys.readouterr().err
    assert main(["run", "--headless", "--flame", "update:61"]) == 2
    assert "seconds must be in (0, 60], got 61" in capsys.readouterr().err


def drive(run: Run, until, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while run.alive and not until() and time.monotonic() < deadline:
        run.pump(0.1)


@pytest.fixture
def pyspy_for_anyone():
    """A copy of py-spy that any user can run. The checkout and its venv may sit under a directory
    other users cannot enter (a 0700 `mktemp -d`, a 0750 home), and so does pytest's tmp_path:
    the copy goes to a fresh directory under the system's temporary directory, opened to all."""
    src = shutil.which(pyspy_command()[0]) if pyspy_command() else None
    if src is None:
        pytest.skip("py-spy is not installed")
    d = Path(tempfile.mkdtemp(prefix="marlwatch-pyspy-"))
    try:
        d.chmod(0o755)
        dst = d / "py-spy"
        shutil.copy2(src, dst)
        dst.chmod(0o755)
        yield str(dst)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# A denied attach made for real: py-spy run as user `nobody` may not ptrace our processes. That
# takes root (runuser) and a user other than ours; without them there is nothing to deny with.
DENY_USER = "nobody"
can_deny = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("runuser") is not None


@pytest.mark.timeout(150)
@pytest.mark.skipif(not can_deny, reason="needs root and runuser, to run py-spy as user nobody against our processes")
def test_denied_attach_keeps_the_run_going(tmp_path, monkeypatch, no_leftovers, pyspy_for_anyone):
    monkeypatch.setenv("MARLWATCH_PYSPY", f"runuser -u {DENY_USER} -- {pyspy_for_anyone}")
    # A recorded run played through a real monitor, whose two workers are stood in for by live
    # Python processes of ours (py-spy is refused by the kernel, not by what they run): no training
    # needed to be denied. `hold`: the run outlives the capture (finish() stops it).
    run, _ = scripted_run(tmp_path, hold=True)
    stand_ins = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2)]
    run.procs[1].pid, run.procs[2].pid = (p.pid for p in stand_ins)
    ctl = FlameController(run)
    ctl.request("sample", 1)
    try:
        drive(run, lambda: ctl.done)
        assert ctl.done, ctl.messages
        assert run.failure is None and run.alive  # the run went on
        denied = [m for m in ctl.messages if "could not profile" in m]
        assert denied == [f"flame: py-spy could not profile worker {slot} (pid {p.pid}): permission denied (ptrace "
                          "not allowed; run as root or set kernel.yama.ptrace_scope=0); the run goes on"
                          for slot, p in enumerate(stand_ins, 1)], ctl.messages
        assert all(p.poll() is None for p in stand_ins)  # py-spy never got to them
    finally:
        run.finish()
        for p in stand_ins:
            p.kill()
            p.wait()
    events = [n for n in open_recording(run.record_path).read_all()["name"].to_pylist() if n and "flame" in n]
    assert events.count("flame_failed") == 2


@pytest.mark.timeout(150)
def test_gone_process_and_unserved_requests_keep_the_run_going(tmp_path, capsys):
    # A run where nothing gets profiled (a recorded run played through a real monitor, stopped
    # inside its warm-up): the processes py-spy is pointed at are gone; `update` never leaves its
    # warm-up; `updat` is a typo. The run goes on and ends normally; the waiting requests say so,
    # and are given up at the end with the reason in the recording.
    run, _ = scripted_run(tmp_path, FLAMED, until_s=25.0)  # start-up until 21 s, warm-up until 28 s
    rec = run.record_path
    ctl = FlameController(run)
    ctl.request("update", 1)
    ctl.request("updat", 1)
    try:
        drive(run, lambda: ctl.slots_for("sample") == [1, 2])
        # (Not the pid of a process that just ended: in a busy test session that pid can be
        # handed out again before py-spy looks. The top of the pid range is free.)
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        gone = [p for p in range(pid_max - 1, 1, -1) if not psutil.pid_exists(p)][:2]
        run.procs[1].pid, run.procs[2].pid = gone
        ctl.request("sample", 1)
        drive(run, lambda: ctl.done)
        for pid in gone:
            gone_msgs = [m for m in ctl.messages if f"(pid {pid})" in m]
            assert len(gone_msgs) == 1 and "the run goes on" in gone_msgs[0], ctl.messages
        assert run.failure is None and run.alive
        run.request_stop("enough")
        drive(run, lambda: False)
    finally:
        run.finish()
    assert run.failure is None, run.failure
    assert ctl.done[0]["samples"] == 0 and len(ctl.done) == 1, ctl.done
    waiting = [m for m in ctl.messages if m.startswith("flame: waiting for 'update' to do real work")]
    assert waiting and "profiling starts at 2%" in waiting[0], ctl.messages
    # With the warm-up's progress, as MADDPG reports it (marlwatch.warmup).
    assert re.search(r"; warming up [\d,]+/2,048 transitions \(\d+%\), waited \d+ s\)$", waiting[0]), waiting
    ended = [m for m in ctl.messages if m.startswith("flame: the run ended before profiling")]
    assert len(ended) == 2, ctl.messages
    assert ended[0].startswith("flame: the run ended before profiling 'update': 'update' never did real work "
                               "('update' took at most "), ended
    assert ended[0].endswith("a capture needs 2%); nothing was profiled; a longer run (--iterations) gives it time")
    assert ended[1] == ("flame: the run ended before profiling 'updat': no process ran 'updat' (phases seen: "
                        "sample, sync, update; is the name right?); nothing was profiled")
    names = [n for n in open_recording(rec).read_all()["name"].to_pylist() if n and n.startswith("flame_")]
    assert names.count("flame_failed") == 2 and names.count("flame_skipped") == 2, names
    # `marlwatch flame` on that file says what happened, without sending the user back to the same command.
    assert main(["flame", str(rec), "--phase", "update"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"marlwatch: {rec} holds no py-spy samples: py-spy could not "
                                               f"profile worker 1 (pid {gone[0]}): "), err
    assert "'update' was not profiled: 'update' never did real work" in err[0] and "marlwatch run" not in err[0]


def synthetic_capture(delay_ms: int, jitter_ms: int, seed: int = 0):
    """Three seconds of a learner's loop (sample ~30 ms, update ~20 ms with update/critic inside,
    sync ~6 ms) and py-spy's samples of it at 100 Hz: stamped `delay_ms` early (py-spy's clock
    started after marlwatch launched it) and up to `jitter_ms` late (stamped when handled).
    Returns (samples, spans, the true top-level phase and innermost span name of each sample)."""
    rng = np.random.default_rng(seed)
    ms = 1_000_000
    stack_of = {"sample": "learner_main (process.py:1);collect (algo.py:5);step (env.py:9)",
                "update": "learner_main (process.py:1);update (algo.py:7);backward (torch.py:3)",
                "sync": "learner_main (process.py:1);gather (workers.py:2);recv (connection.py:1)"}
    spans, t, it = [], 0, 0
    while t < 3000 * ms:
        for name, mean in (("sample", 30), ("update", 20), ("sync", 6)):
            d = int(mean * ms * rng.uniform(0.8, 1.2))
            spans.append((t, d, name, it, True))
            if name == "update":
                spans.append((t + 2 * ms, d // 2, "update/critic", it, False))
            t += d
        it += 1
    true = np.arange(0, 3000 * ms, 10 * ms)
    truth = []
    for x in true.tolist():
        inner = [s for s in spans if s[0] <= x < s[0] + s[1]]
        truth.append((next(s[2] for s in inner if s[4]), min(inner, key=lambda s: s[1])[2]))
    stamps = true - delay_ms * ms + rng.integers(0, jitter_ms * ms + 1, len(true))
    return Samples(stamps.astype(np.int64), [stack_of[top] for top, _ in truth]), spans, truth


def test_alignment_finds_py_spys_clock_and_attributes_every_sample():
    # py-spy started 120 ms late, stamps up to 3 ms late: the shift is found from the stacks alone.
    samples, spans, truth = synthetic_capture(delay_ms=120, jitter_ms=3)
    batch, unattributed, alignment = attribute(0, samples, spans, rate=100)
    assert unattributed == 0 and abs(alignment["shift_ms"] - 118.5) <= 2, alignment
    assert alignment["agreement"] > 0.9, alignment
    top_of_stack = {"collect": "sample", "update": "update", "gather": "sync"}
    rows = batch.to_pylist()
    assert sum(r["value"] for r in rows) == len(truth)
    for r in rows:  # every sample is in the top-level phase its own stack is in
        assert r["name"].split("/")[0] == top_of_stack[r["text"].split(";")[1].split(" ")[0]], r
    # Stamps without delay or jitter: each sample goes to the innermost span open at its time.
    samples, spans, truth = synthetic_capture(delay_ms=0, jitter_ms=0)
    batch, unattributed, alignment = attribute(0, samples, spans, rate=100)
    assert alignment["shift_ms"] == 0 and unattributed == 0
    got = [name for r in batch.to_pylist() for name in [r["name"]] * int(r["value"])]
    assert got == [inner for _, inner in truth]


def test_chrometrace_rebuild_counts_samples():
    # Three samples of a;b, two of a;c at 100 Hz: B/E events only where the stack changed.
    ev = [
        {"ph": "M", "name": "thread_name", "tid": 7, "args": {"name": "1: MainThread"}},
        {"ph": "B", "name": "a", "tid": 7, "ts": 0, "args": {"filename": "x.py", "line": 1}},
        {"ph": "B", "name": "b", "tid": 7, "ts": 0, "args": {"filename": "x.py", "line": 2}},
        {"ph": "E", "name": "b", "tid": 7, "ts": 30000, "args": {"filename": "x.py", "line": 2}},
        {"ph": "B", "name": "c", "tid": 7, "ts": 30000, "args": {"filename": "x.py", "line": 3}},
        {"ph": "E", "name": "c", "tid": 7, "ts": 50000, "args": {"filename": "x.py", "line": 3}},
        {"ph": "E", "name": "a", "tid": 7, "ts": 50000, "args": {"filename": "x.py", "line": 1}},
        {"ph": "B", "name": "other", "tid": 8, "ts": 0, "args": {"filename": "y.py", "line": 1}},
    ]
    s = samples_from_chrometrace(ev, 100, origin_ns=1_000_000_000)
    assert Counter(s.stacks) == {"a (x.py:1);b (x.py:2)": 3, "a (x.py:1);c (x.py:3)": 2}
    assert s.t_ns.tolist() == [1_000_000_000 + k * 10_000_000 for k in range(5)]


def test_replay_shows_the_samples_from_their_time_on(flamed):
    from marlwatch.playback import Playback

    table = open_recording(flamed).read_all()
    first = min(t for t, k in zip(table["t_ns"].to_pylist(), table["kind"].to_pylist(), strict=True) if k == "stack")
    pb = Playback.from_recording(open_recording(flamed))
    pb.seek_ns(first - 1)
    assert pb.snapshot().stacks == {}  # before py-spy ran: nothing to show
    # `sample` is profiled first (at once), `update` after the warm-up; samples are stored when
    # their capture is done.
    done = {d["phase"]: d["t_ns"] for d in events(table, "flame_done")}
    pb.seek_ns(done["sample"] + 1_000_000_000)
    assert pb.snapshot().top_functions("sample") and not pb.snapshot().top_functions("update")
    pb.to_end()
    assert pb.snapshot().top_functions("update")


def feed_iterations(act, slot: int, update_ms: list[float], iteration_ms: float = 40.0, t0_ns: int = 0) -> int:
    """One learner-like iteration per entry: sync/gather, then `update` taking `update_ms`."""
    import numpy as np

    t = t0_ns
    names = ["sync/gather", "update"]
    for u in update_ms:
        gather = int((iteration_ms - u) * 1e6)
        act.add_spans(np.array([slot, slot]), names, np.array([0, 1]), np.array([t, t + gather]),
                      np.array([gather, int(u * 1e6)]))
        t += gather + int(u * 1e6)
        act.add_ticks(np.array([slot]), np.array([t]))
    return t


def test_real_work_is_the_median_iteration_share_of_the_top_level_phase():
    from marlwatch.phase_activity import PhaseActivity

    act = PhaseActivity()
    assert act.share("update", [0]) is None  # nothing seen yet
    # A warm-up: 0.1 ms stores in 500 ms iterations, one of them descheduled for 67 ms (a plain
    # share of the last 2 s would be 3.4%, over the threshold).
    t = feed_iterations(act, 0, [0.1, 0.1, 0.1, 67.0, 0.1, 0.1, 0.1], iteration_ms=500)
    s = act.share("update/critic", [0])  # a sub-phase is judged on its top-level phase
    assert s is not None and s.iterations == 5 and s.share == pytest.approx(0.1 / 500)
    assert not act.real_work("update", [0])
    # The warm-up ends: 8 ms of 40 ms. Real work once most of the last 5 iterations show it.
    for _ in range(2):
        t = feed_iterations(act, 0, [8.0], t0_ns=t)
        assert not act.real_work("update", [0])
    feed_iterations(act, 0, [8.0], t0_ns=t)
    assert act.real_work("update", [0]) and act.share("update", [0]).share == pytest.approx(0.2)
    # Other phases of the same process are measured the same way; absent ones are 0.
    assert act.share("sync/gather", [0]).share == pytest.approx(0.8)
    assert act.share("sample", [0]).share == 0.0


def test_real_work_without_iterations_uses_a_time_window():
    import numpy as np

    from marlwatch.phase_activity import NO_TICKS_S, PhaseActivity

    act = PhaseActivity()
    # A process that never ticks: 10 ms of `update` every 100 ms, judged on its last 2 s once it
    # ran NO_TICKS_S without a tick.
    for k in range(int(NO_TICKS_S * 10) + 1):
        t = k * 100_000_000
        act.add_spans(np.array([3, 3]), ["other", "update"], np.array([0, 1]), np.array([t, t + 90_000_000]),
                      np.array([90_000_000, 10_000_000]))
        if k == int(NO_TICKS_S * 10) - 5:
            assert act.share("update", [3]) is None  # not long enough yet
    s = act.share("update", [3])
    assert s is not None and s.iterations == 0 and s.share == pytest.approx(0.1, abs=0.01)


def _window(start_iter: int, update_ms: float, sample_ms: float = 10.0) -> pa.RecordBatch:
    """Ten iterations of a learner: a sample and an update span each, then the tick."""
    rows, ms = [], 1_000_000
    for i in range(start_iter, start_iter + 10):
        t = i * 100 * ms
        rows += [{"kind": "span", "proc": 0, "name": "sample", "t_ns": t, "dur_ns": int(sample_ms * ms), "iter": i},
                 {"kind": "span", "proc": 0, "name": "update", "t_ns": t + 20 * ms, "dur_ns": int(update_ms * ms),
                  "iter": i},
                 {"kind": "iter", "proc": 0, "t_ns": t + 90 * ms, "iter": i + 1}]
    return pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def test_auto_trigger_fires_once_when_a_p95_jumps_after_its_baseline():
    info = open_recording(SHIPPED).info
    auto = AutoTrigger(info)
    auto.add(_window(0, update_ms=5))
    assert auto.check() is None  # the first window is start-up
    auto.add(_window(10, update_ms=5))
    assert auto.check() is None  # the baseline
    auto.add(_window(20, update_ms=5.5))
    assert auto.check() is None  # within 1.5x: no jump
    auto.add(_window(30, update_ms=9))
    fired = auto.check()
    assert fired is not None and fired[0] == "update" and fired[1].startswith("p95 of 'update' jumped from ")
    assert auto.fired and not auto.due()
    auto.add(_window(40, update_ms=50))
    assert auto.check() is None  # once


def test_auto_trigger_fires_when_another_phase_stays_the_hottest_for_two_windows():
    auto = AutoTrigger(open_recording(SHIPPED).info)
    # sample is the hottest phase, then update is (sample got faster; update's p95 barely moved):
    # one window is not enough, the second in a row fires.
    for k, (sample, update) in enumerate([(10, 9), (10, 9), (6, 9.5), (6, 9.5)]):
        auto.add(_window(10 * k, update_ms=update, sample_ms=sample))
        fired = auto.check()
        assert (fired is None) == (k < 3), (k, fired)
    assert fired == ("update", "'update' became the hottest phase (was 'sample')")

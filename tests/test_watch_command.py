"""`marlwatch run -- COMMAND`: a user's own program, watched with real processes and sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.compute as pc
import pytest

from marlwatch.recording import open_recording
from tests.conftest import REPO, marlwatch
from tests.watch_helpers import env_with_repo, start_marlwatch, write_loop


def _rows(path, kind: str):
    rec = open_recording(path)
    out = []
    for b in rec.batches():
        sel = b.filter(pc.equal(b.column("kind"), kind))
        out += sel.to_pylist()
    return rec, out


@pytest.mark.timeout(120)
def test_a_command_is_watched_and_its_exit_code_is_marlwatchs(tmp_path, no_leftovers):
    loop = write_loop(tmp_path)
    path = tmp_path / "cmd.arrow"
    r = marlwatch("run", "--headless", "--record", str(path), "--", sys.executable, str(loop), "60", "3",
                  env=env_with_repo())
    assert r.returncode == 3, r.stderr  # the command's own exit code
    assert "Traceback" not in r.stderr
    assert "exited with code 3" in r.stderr and "loop done" in r.stdout  # its output is the user's to see
    rec = open_recording(path)
    assert rec.info.launcher == "command"
    assert rec.info.extra["command"] == [sys.executable, str(loop), "60", "3"]
    assert rec.info.extra["cwd"] and isinstance(rec.info.extra["git_commit"], str | type(None))
    summary = json.loads(marlwatch("summary", "--json", str(path)).stdout)
    assert summary["status"] == "complete" and summary["iterations"] == 60 and summary["ips"] > 0
    assert {"sample/env_step", "update", "update/comm/messages"} <= set(summary["phases"])
    assert summary["comm_share"] > 0


@pytest.mark.timeout(60)
def test_a_command_that_does_not_exist_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "none.arrow"
    r = marlwatch("run", "--headless", "--record", str(path), "--", "no-such-command-here", "x")
    assert r.returncode == 2
    assert r.stderr.strip() == "marlwatch: no-such-command-here: command not found"
    assert not path.exists()
    r = marlwatch("run", "--headless", "--agents", "4", "--", "true")
    assert r.returncode == 2 and r.stderr.startswith("marlwatch: --agents") and "Traceback" not in r.stderr
    r = marlwatch("summary", "--", "x")  # elsewhere `--` only ends the options
    assert r.returncode == 2 and r.stderr.strip() == "marlwatch: x: no such file"


@pytest.mark.timeout(60)
def test_a_command_that_never_connects_still_gets_cpu_and_memory(tmp_path, no_leftovers):
    path = tmp_path / "quiet.arrow"
    burn = "import time\nt = time.time()\nwhile time.time() - t < 2.5: sum(i * i for i in range(1000))"
    r = marlwatch("run", "--headless", "--no-auto-phases", "--record", str(path), "--", sys.executable, "-c", burn)
    assert r.returncode == 0, r.stderr
    assert "no spans arrived" in r.stderr
    rec, procs = _rows(path, "proc")
    assert rec.complete
    cpu = [row["value"] for row in procs if row["proc"] == 0 and row["name"] == "cpu_percent"]
    assert len(cpu) >= 4 and max(cpu) > 30  # the busy command, 2.5 s of it sampled at PROC_SAMPLE_HZ (2 Hz)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_group_stops_the_command_cleanly(tmp_path, sig):
    loop = write_loop(tmp_path)
    path = tmp_path / "stop.arrow"
    proc = start_marlwatch("run", "--headless", "--record", str(path), "--", sys.executable, str(loop), "100000")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 3000):
        time.sleep(0.2)
    time.sleep(1.0)
    members = psutil.Process(proc.pid).children(recursive=True)
    assert members, "the command is not running"
    os.killpg(proc.pid, sig)  # `timeout`, systemd, a job scheduler: the whole group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    # The command got SIGINT, as from Ctrl-C: its own KeyboardInterrupt traceback is its business.
    # No frame of marlwatch's own code (the checkout's folder may well be called marlwatch too).
    assert f'File "{REPO / "marlwatch"}/' not in err and "run failed" not in err
    rec, ends = _rows(path, "end")
    assert rec.complete
    detail = json.loads(ends[-1]["text"])
    assert detail["failure"] is None and signal.Signals(sig).name in detail["stop_reason"]
    _, alive = psutil.wait_procs(members, timeout=10)
    assert not alive


@pytest.mark.timeout(150)
def test_the_live_app_watches_a_command_and_q_stops_it_cleanly(tmp_path, no_leftovers):
    import asyncio

    from marlwatch.app.live import LiveApp
    from marlwatch.app.widgets import RunHeader
    from marlwatch.cli.parser import build_parser
    from marlwatch.cli.run import finish_message, make_run, start_run
    from tests.conftest import wait_for

    loop = write_loop(tmp_path)
    args = build_parser().parse_args(["run", "--record", str(tmp_path / "live.arrow")])
    args.user_command = [sys.executable, str(loop), "100000"]
    run = make_run(args, default_iterations=None, command_log=True)
    start_run(run)
    app = LiveApp(run)

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.ips > 0
                           and {"sample/env_step", "update/comm/messages"} <= {p.name for p in app.snapshot.phases},
                           60, "the command's phases and IPS")
            assert "loop.py" in app.query_one(RunHeader).plain
            assert app.snapshot.comm_share > 0
            await pilot.press("q")
            await wait_for(pilot, lambda: app.run_done.is_set(), 30, "the command to stop")

    asyncio.run(scenario())
    assert run.launcher.stopped_by_us and run.failure is None
    assert finish_message(run, app.metrics.snapshot()) == 0  # q is a clean stop, whatever the command's code
    rec = open_recording(run.record_path)
    list(rec.batches())
    assert rec.complete
    assert (tmp_path / "live.log").exists()  # the command's output, which the app's screen could not show


@pytest.mark.timeout(120)
def test_a_command_behind_a_shell_gets_its_iterations_from_the_process_that_ticks(tmp_path, no_leftovers):
    # The command is often a shell script or a launcher that starts the training process: the run's
    # iterations are those of the first process that ticks, not of the shell that never does.
    loop = write_loop(tmp_path)
    path = tmp_path / "shell.arrow"
    r = marlwatch("run", "--headless", "--record", str(path), "--", "sh", "-c", f"'{sys.executable}' '{loop}' 40",
                  env=env_with_repo())
    assert r.returncode == 0, r.stderr
    summary = json.loads(marlwatch("summary", "--json", str(path)).stdout)
    assert summary["iterations"] == 40 and summary["ips"] > 0
    roles = {p["role"] for p in summary["procs"]} if isinstance(summary.get("procs"), list) else None
    assert roles is None or any("sh" in role for role in roles)


def test_processes_found_in_the_tree_are_named_by_what_they_run(tmp_path):
    """multiprocessing's helpers are all `python` by name: the module a `-c` imports names them."""
    from marlwatch.launchers.command import found_role

    script = tmp_path / "helper.py"
    script.write_text("import time\ntime.sleep(60)\n")
    procs = [subprocess.Popen([sys.executable, "-B", "-c", "from json import tool; import time; time.sleep(60)"]),
             subprocess.Popen([sys.executable, str(script), "--flag"]),
             subprocess.Popen(["sleep", "60"])]
    try:
        roles = [found_role(psutil.Process(p.pid)) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    python = os.path.basename(sys.executable)
    assert roles == [f"pid {procs[0].pid} (json)", f"pid {procs[1].pid} ({python} helper.py)",
                     f"pid {procs[2].pid} (sleep)"]


@pytest.mark.timeout(60)
def test_a_process_found_between_fork_and_exec_is_named_by_what_it_execs(tmp_path, no_leftovers):
    """A fork has its parent's command line until it execs (multiprocessing's forkserver, on a
    loaded machine, was listed as `python train.py`): the walk names a process once it has settled."""
    forker = tmp_path / "forker.py"
    forker.write_text("import os, time\n"
                      "pid = os.fork()\n"
                      "if pid == 0:\n"
                      "    time.sleep(1.5)  # a walk of the tree (every 1 s) sees the fork before it execs\n"
                      "    os.execvp('sleep', ['sleep', '2'])\n"
                      "os.waitpid(pid, 0)\n")
    path = tmp_path / "fork.arrow"
    r = marlwatch("run", "--headless", "--record", str(path), "--", sys.executable, str(forker), env=env_with_repo())
    assert r.returncode == 0, r.stderr
    summary = json.loads(marlwatch("summary", "--json", str(path)).stdout)
    found = [p["role"] for p in summary["procs"] if p["role"].startswith("pid ")]
    assert len(found) == 1 and found[0].endswith("(sleep)"), summary["procs"]

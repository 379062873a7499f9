"""The process side of watching a user's own program: a process whose environment names a
monitor connects on first use, its children (fork, spawn, forkserver, subprocess) each connect
on their own, a monitor that is gone or refuses the key costs one warning line, and the start-up
hook (marlwatch/_autostart/sitecustomize.py). Real processes against a real Listener."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from marlwatch import autostart_dir
from tests.tiny_monitor import TinyMonitor, python


@pytest.fixture
def monitor():
    with TinyMonitor() as m:
        yield m


def test_a_script_connects_on_first_use_and_says_who_it_is(monitor, tmp_path):
    script = textwrap.dedent("""
        import marlwatch
        with marlwatch.span("sample"):
            with marlwatch.span("sample/env_step"):
                pass
        marlwatch.tick()
    """)
    (tmp_path / "train.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "train.py"), "--lr", "3e-4"],
                            env=monitor.env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == ""
    monitor.wait_ended(1)
    (hello,) = monitor.hellos()
    assert hello["type"] == "hello" and hello["pid"] == proc.pid and hello["ppid"] == os.getpid()
    assert hello["role"] == f"{os.path.basename(sys.executable)} train.py --lr 3e-4"
    assert hello["argv"] == [str(tmp_path / "train.py"), "--lr", "3e-4"]
    assert hello["threads"] is True and hello["auto_phases"] is False and hello["spans_impl"] in ("c", "python")
    assert monitor.spans(0) == [("sample/env_step", "sample"), ("sample", None)]
    assert monitor.ticks(0) == 1


CHILDREN = textwrap.dedent("""
    import multiprocessing as mp
    import subprocess
    import sys

    import marlwatch

    def child(tag):
        with marlwatch.span("sample/" + tag):
            pass
        marlwatch.tick()

    if __name__ == "__main__":
        with marlwatch.span("sample/parent"):  # connected before the fork: the child must not use it
            pass
        for method in sys.argv[1].split(","):
            p = mp.get_context(method).Process(target=child, args=(method,))
            p.start()
            p.join()
            assert p.exitcode == 0, p.exitcode
        code = "import marlwatch\\nwith marlwatch.span('sample/subprocess'):\\n    pass"
        subprocess.run([sys.executable, "-c", code], check=True)
        with marlwatch.span("sample/parent"):
            pass
        marlwatch.tick()
""")


def test_fork_spawn_forkserver_and_subprocess_children_each_connect_on_their_own(monitor, tmp_path):
    (tmp_path / "kids.py").write_text(CHILDREN)
    proc = subprocess.run([sys.executable, "kids.py", "fork,spawn,forkserver"], env=monitor.env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    monitor.wait_ended(5)
    hellos = monitor.hellos()
    assert len({h["pid"] for h in hellos}) == 5, monitor.summary()
    roles = monitor.by_role()
    parent = roles[f"{os.path.basename(sys.executable)} kids.py fork,spawn,forkserver"]
    assert set(roles) >= {"ForkProcess-1", "SpawnProcess-2", "ForkServerProcess-3"}, roles
    # Each process's spans arrive on its own connection, and only there.
    assert monitor.spans(parent) == [("sample/parent", None)] * 2 and monitor.ticks(parent) == 1
    for role, tag in [("ForkProcess-1", "fork"), ("SpawnProcess-2", "spawn"), ("ForkServerProcess-3", "forkserver")]:
        assert monitor.spans(roles[role]) == [(f"sample/{tag}", None)], role
        assert monitor.ticks(roles[role]) == 1
        assert hellos[roles[role]]["ppid"] != os.getpid()
    (sub,) = [i for r, i in roles.items() if " -c import marlwatch" in r]
    assert monitor.spans(sub) == [("sample/subprocess", None)]


def test_a_refused_key_is_one_warning_line_and_the_program_runs_on(monitor, tmp_path):
    (tmp_path / "kids.py").write_text(CHILDREN)
    proc = subprocess.run([sys.executable, "kids.py", "fork,spawn"], env=monitor.env(key=b"wrong key"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("marlwatch: warning: cannot connect to the monitor at"), lines
    assert "refused the key" in lines[0]
    assert monitor.refused >= 1 and monitor.hellos() == []


def test_a_monitor_that_is_gone_is_one_warning_line(tmp_path):
    env = {**os.environ, "MARLWATCH_ADDRESS": f"unix:{tmp_path}/gone.sock", "MARLWATCH_AUTHKEY": "00ff"}
    proc = python("import marlwatch\nwith marlwatch.span('sample'):\n    pass\nmarlwatch.tick()\n"
                  "assert marlwatch.telemetry().sink is None\n", env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("marlwatch: warning: cannot connect"), lines


@pytest.mark.parametrize("address", ["relative.sock", "unix:relative.sock", "localhost:http"])
def test_a_malformed_address_is_one_warning_line(tmp_path, address):
    env = {**os.environ, "MARLWATCH_ADDRESS": address, "MARLWATCH_AUTHKEY": "00"}
    proc = python("import marlwatch\nmarlwatch.tick()\n", env, tmp_path)
    assert proc.returncode == 0 and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_without_the_environment_nothing_connects_and_nothing_is_said(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARLWATCH_")}
    proc = python("import marlwatch\nwith marlwatch.span('sample'):\n    pass\nmarlwatch.tick()\n"
                  "assert marlwatch.telemetry().sink is None\n", env, tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_the_first_use_may_come_from_any_thread(monitor, tmp_path):
    script = textwrap.dedent("""
        import threading
        import marlwatch

        def work():
            with marlwatch.span("sample"):
                pass

        t = threading.Thread(target=work)
        t.start()
        t.join()
        with marlwatch.span("update"):
            pass
        marlwatch.tick()
    """)
    proc = python(script, monitor.env(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    monitor.wait_ended(1)
    assert sorted(monitor.spans(0)) == [("sample", None), ("update", None)]


# -- the start-up hook -------------------------------------------------------------------------
def _run_with_bootstrap(tmp_path, code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("watched", [False, True])
def test_the_startup_hook_chains_to_the_sitecustomize_it_shadows(monitor, tmp_path, watched):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['CHAINED'] = __file__\n")
    env = monitor.env(auto_phases=True, bootstrap=True) if watched else {
        k: v for k, v in os.environ.items() if not k.startswith("MARLWATCH_")}
    env["PYTHONPATH"] = os.pathsep.join([autostart_dir(), str(other), env.get("PYTHONPATH", "")])
    code = ("import os, sys\nprint(os.environ.get('CHAINED'))\nprint(sys.modules['sitecustomize'].__file__)\n"
            "print('marlwatch.autophases' in sys.modules)")
    proc = _run_with_bootstrap(tmp_path, code, env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    chained, module, hooked = proc.stdout.split()
    assert chained == module == str(other / "sitecustomize.py")
    assert hooked == str(watched)  # unwatched: the hook imported nothing of marlwatch


def test_the_startup_hook_never_stops_a_program(monitor, tmp_path):
    # A Python where `marlwatch` cannot be imported (another environment): one line, and on.
    env = monitor.env(auto_phases=True)
    fake = tmp_path / "marlwatch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not this one')\n")
    env["PYTHONPATH"] = os.pathsep.join([autostart_dir(), str(tmp_path)])
    proc = _run_with_bootstrap(tmp_path, "print('ran')", env)
    assert proc.returncode == 0 and proc.stdout == "ran\n", proc.stderr
    assert proc.stderr.startswith("marlwatch: warning: auto phases not installed") and len(proc.stderr.splitlines()) == 1

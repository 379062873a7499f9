"""`marlwatch listen`: processes started elsewhere connect and leave; bad clients never hurt it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import AuthenticationError, Client

import pyarrow.compute as pc
import pytest

from marlwatch.recording import open_recording
from tests.conftest import marlwatch
from tests.watch_helpers import env_with_repo, read_exports, start_marlwatch, write_loop


def _client_address(address: str):
    if address.startswith("unix:"):
        return address[5:], "AF_UNIX"
    host, port = address.rsplit(":", 1)
    return (host, int(port)), "AF_INET"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("address", [None, "127.0.0.1:0"])
def test_two_processes_connect_one_leaves_bad_clients_are_refused(tmp_path, address):
    path = tmp_path / "listen.arrow"
    proc = start_marlwatch("listen", "--headless", "--record", str(path),
                           *(["--address", address] if address else []))
    long_one = None
    try:
        exports = read_exports(proc)
        env = {**env_with_repo(), **exports}
        loop = write_loop(tmp_path)
        long_one = subprocess.Popen([sys.executable, str(loop), "100000"], env={**env, "LOOP_ROLE": "long"},
                                    stdout=subprocess.DEVNULL)
        short_one = subprocess.Popen([sys.executable, str(loop), "30"], env={**env, "LOOP_ROLE": "short"},
                                     stdout=subprocess.DEVNULL)
        assert short_one.wait(timeout=60) == 0
        target, family = _client_address(exports["MARLWATCH_ADDRESS"])
        with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
            Client(target, family=family, authkey=b"not the key")
        raw = socket.socket(socket.AF_UNIX if family == "AF_UNIX" else socket.AF_INET)
        raw.connect(target)
        raw.sendall(b"\x00\x00\x00\x10this is not a frame at all")
        raw.close()
        time.sleep(1.5)
        assert long_one.poll() is None, "the long loop died when others left or misbehaved"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        time.sleep(0.5)
        assert long_one.poll() is None  # the monitor went away: the user's program runs on
    finally:
        for p in (proc, long_one):
            if p is not None and p.poll() is None:
                p.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    if address is None:  # the private socket's folder goes with the monitor
        assert not os.path.exists(os.path.dirname(exports["MARLWATCH_ADDRESS"][len("unix:"):]))
    rec = open_recording(path)
    spans_by_proc: dict[int, int] = {}
    events = []
    for b in rec.batches():
        spans = b.filter(pc.equal(b.column("kind"), "span"))
        for slot, n in zip(*pc.value_counts(spans.column("proc")).flatten(), strict=True):
            spans_by_proc[slot.as_py()] = spans_by_proc.get(slot.as_py(), 0) + n.as_py()
        events += b.filter(pc.equal(b.column("kind"), "event")).to_pylist()
    assert rec.complete
    started = {e["proc"]: json.loads(e["text"])["role"] for e in events if e["name"] == "started"}
    assert sorted(started.values()) == ["long", "short"]
    assert all(spans_by_proc.get(slot, 0) > 0 for slot in started)
    short_slot = next(s for s, role in started.items() if role == "short")
    assert any(e["name"] == "left" and e["proc"] == short_slot for e in events)
    refused = [json.loads(e["text"]) for e in events if e["name"] in ("connection_refused", "connection_dropped")]
    assert any("wrong key" in r["reason"] for r in refused), refused
    assert len(refused) >= 2, refused  # the garbage client too


@pytest.mark.timeout(60)
def test_listen_bad_addresses_are_usage_errors(tmp_path):
    r = marlwatch("listen", "--headless", "--address", "0.0.0.0:0", "--record", str(tmp_path / "a.arrow"))
    assert r.returncode == 2 and "--allow-remote" in r.stderr and "Traceback" not in r.stderr
    r = marlwatch("listen", "--headless", "--address", f"unix:{tmp_path}/no/such/dir/x.sock",
                  "--record", str(tmp_path / "b.arrow"))
    assert r.returncode == 2 and r.stderr.startswith("marlwatch: cannot listen on") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "b.arrow").exists()
    r = marlwatch("listen", "--headless", "--address", "nonsense")
    assert r.returncode == 2 and "HOST:PORT or unix:PATH" in r.stderr


def test_a_process_whose_monitor_is_gone_runs_on(tmp_path):
    # The environment names a monitor that is not there: the user's program must not die of it.
    env = {**env_with_repo(), "MARLWATCH_ADDRESS": f"unix:{tmp_path}/gone.sock", "MARLWATCH_AUTHKEY": "00" * 32}
    code = "import marlwatch\nwith marlwatch.span('sample/x'):\n    pass\nmarlwatch.tick()\nprint('ok')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                       cwd=os.getcwd())
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr

"""Clock offsets (marlwatch/clock.py): the estimate's arithmetic on hand-made times, and a process
whose clock is an hour ahead of the monitor's (as one on another machine would be) recorded on the
monitor's timeline by a real `marlwatch listen`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from marlwatch.clock import BURST, RESYNC_S, ClockSync
from tests.ray_helpers import events, table
from tests.watch_helpers import env_with_repo, listen_with

MS = 1_000_000


def _burst(sync: ClockSync, start: int, answers: list[tuple[int, int]]) -> object:
    """Requests at `start`, `start` + 10 ms, ...; each answered after (rtt, process time)."""
    est = None
    for k, (rtt, t_proc) in enumerate(answers):
        t1 = start + k * 10 * MS
        req = sync.request(t1)
        assert req is not None and req["type"] == "clock_req"
        assert sync.request(t1 + 1) is None  # one request in flight at a time
        est = sync.response(req["seq"], t_proc, t1 + rtt)
    return est


def test_minimum_round_trip_sample_wins():
    sync = ClockSync(0, same_clock=False, hello_t_ns=5_000 * MS)
    assert sync.applied_ns == 5_000 * MS  # provisional: the hello's stamp, until the first estimate
    assert not sync.settled(0)
    true_offset = 7_000 * MS
    # The process stamps its answer at the monitor's t1 + d (its clock: + true_offset). Samples that
    # waited in a queue on the way back have a long rtt and an offset estimate off by about rtt / 2.
    answers = [(8 * MS, 0 * 10 * MS + 1 * MS + true_offset),
               (2 * MS, 1 * 10 * MS + 1 * MS + true_offset),  # the best: error 0
               (20 * MS, 2 * 10 * MS + 1 * MS + true_offset),
               (5 * MS, 3 * 10 * MS + 4 * MS + true_offset),
               (9 * MS, 4 * 10 * MS + 1 * MS + true_offset)]
    est = _burst(sync, 0, answers)
    assert est is not None and est.samples == BURST
    assert est.rtt_ns == 2 * MS and est.offset_ns == true_offset
    assert sync.applied_ns == true_offset and sync.settled(0)
    # No new request until the next burst is due; then five more.
    assert sync.request(60 * MS) is None
    later = int(RESYNC_S * 1e9) + 60 * MS
    est2 = _burst(sync, later, [(3 * MS, later + k * 10 * MS + 1 * MS + true_offset + 50_000) for k in range(BURST)])
    assert est2.offset_ns == true_offset + 50_000 - 500_000  # stamped 1 ms after the request, rtt 3 ms: -0.5 ms


def test_same_clock_applies_zero_and_unanswered_requests_are_sent_again():
    sync = ClockSync(0, same_clock=True)
    assert sync.settled(0)
    req = sync.request(0)
    assert sync.request(1_000 * MS) is None
    assert sync.request(2_500 * MS)["seq"] == req["seq"] + 1  # the first was lost: asked again
    assert sync.response(req["seq"], 123, 2_600 * MS) is None  # a late answer to an old request is ignored
    assert sync.applied_ns == 0


# A process with a clock an hour ahead: it speaks the wire protocol itself (marlwatch.wire),
# stamping everything with perf_counter_ns() + SHIFT, and answers the monitor's clock requests.
SKEWED = r'''
import json, os, sys, threading, time
from array import array
from marlwatch import wire
from marlwatch.instrument import dial, parse_address
SHIFT = 3600 * 10**9
now = lambda: time.perf_counter_ns() + SHIFT
conn = dial(parse_address(os.environ["MARLWATCH_ADDRESS"]), bytes.fromhex(os.environ["MARLWATCH_AUTHKEY"]))
lock = threading.Lock()
def send(b):
    with lock:
        conn.send_bytes(b)
send(wire.encode_control({"type": "hello", "t_ns": now(), "pid": os.getpid(), "role": "skewed",
                          "clock": {"v": 1, "boot_id": "another machine"}}))
def answer():
    while True:
        try:
            m = json.loads(conn.recv_bytes()[1:])
        except (EOFError, OSError):
            return
        t = now()
        send(wire.encode_control({"type": "clock_resp", "seq": m["seq"], "t_ns": t}))
threading.Thread(target=answer, daemon=True).start()
names = ["sample"]
for i in range(30):
    t0 = now(); time.sleep(0.02); t1 = now()
    send(wire.encode_batch(new_names=names, ids=array("i", [0]), parents=array("i", [-1]), t0=array("q", [t0]),
                           t1=array("q", [t1]), n=1, ticks=[t1], first_iteration=i, counters=[]))
    names = []
print("done", flush=True)
'''


@pytest.mark.timeout(180)
def test_a_process_an_hour_ahead_lands_on_the_monitor_timeline(tmp_path):
    path = tmp_path / "skew.arrow"
    listen_with(path, ["-c", SKEWED])
    t = table(path)
    started = events(t, "started")[0]
    assert started["role"] == "skewed" and started["same_machine"] is False
    clock = events(t, "clock")[0]
    assert clock["same_clock"] is False and clock["applied_ns"] == clock["offset_ns"]
    assert abs(clock["offset_ns"] - 3600 * 10**9) <= clock["rtt_ns"] / 2 + 1_000_000
    spans = t.filter(t["kind"].to_numpy(zero_copy_only=False) == "span")
    starts = spans["t_ns"].to_pylist()
    end = events(t, "left")[0]["t_ns"]
    # On the monitor's timeline: after the process said hello and before it left (an hour off otherwise).
    assert len(starts) == 30 and all(started["t_ns"] - 50 * MS <= s <= end for s in starts)
    r = subprocess.run([sys.executable, "-m", "marlwatch", "summary", "--json", str(path)], env=env_with_repo(),
                       capture_output=True, text=True, timeout=60)
    proc = json.loads(r.stdout)["procs"][0]
    assert proc["clock_offset_ms"] == pytest.approx(3.6e6, abs=5)


@pytest.mark.timeout(180)
def test_flame_says_it_cannot_reach_a_process_on_another_machine(tmp_path):
    path = tmp_path / "flame.arrow"
    r = subprocess.run([sys.executable, "-m", "marlwatch", "run", "--headless", "--flame", "sample:1", "--record",
                        str(path), "--", sys.executable, "-c", SKEWED.replace("range(30)", "range(150)")],
                       env=env_with_repo(), capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "flame: py-spy could not profile skewed: it runs on another machine" in r.stderr, r.stderr[-2000:]
    failed = events(table(path), "flame_failed")
    assert failed and "another machine" in failed[0]["error"]

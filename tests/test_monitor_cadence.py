"""What the monitor does each second while a run goes on (issue 14: a monitor that costs almost
nothing): system samples become rows once per delivery, per-process figures are sampled at most
PROC_SAMPLE_HZ, and rows reach the listeners and the writer at most every DELIVER_S unless a view
asks for them (`deliver()`) or DELIVER_ROWS are waiting."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.collector import SystemSamples, event_row
from marlwatch.monitor import DELIVER_ROWS, DELIVER_S, PROC_SAMPLE_HZ, Monitor
from marlwatch.recording import RunInfo, open_recording
from marlwatch.sysstats import ProcSample


def test_samples_become_one_batch_of_rows_in_time_order():
    samples = SystemSamples()
    assert samples.rows() is None
    samples.add_cores(100, [10.0, 20.0])
    samples.add_procs(100, [ProcSample(0, 50.0, 1 << 20), ProcSample(2, 75.0, 2 << 20)])
    samples.add_cores(200, [30.0, 40.0, 50.0], first=8)  # a node's cores, numbered from 8
    samples.add_procs(250, [])
    rows = samples.rows()
    assert samples.rows() is None  # taken
    cores = rows.filter(pc.equal(rows["kind"], "core")).to_pydict()
    assert cores["t_ns"] == [100, 100, 200, 200, 200]
    assert cores["core"] == [0, 1, 8, 9, 10]
    assert cores["value"] == [10.0, 20.0, 30.0, 40.0, 50.0]
    procs = rows.filter(pc.equal(rows["kind"], "proc")).to_pydict()
    assert procs["proc"] == [0, 0, 2, 2] and procs["t_ns"] == [100] * 4
    assert procs["name"] == ["cpu_percent", "rss_bytes"] * 2
    assert procs["value"] == [50.0, float(1 << 20), 75.0, float(2 << 20)]


def test_rows_are_delivered_when_due_or_asked_for(tmp_path):
    info = RunInfo(algo="none", env="none", agents=0, workers=0, seed=0, iterations=None, cores=os.cpu_count() or 1,
                   procs={}, pinning={})
    monitor = Monitor(info, tmp_path / "m.arrow", sample_hz=20.0)
    monitor.open()
    monitor.set_pid(monitor.add_process("me"), os.getpid())
    delivered: list[pa.RecordBatch] = []
    monitor.listeners.append(delivered.append)

    start = time.monotonic()
    while time.monotonic() - start < 2.2:
        monitor.pump(0.05)
        monitor.run_hooks(False)  # what Run.pump does after each pump
    pumped_s = time.monotonic() - start
    # One delivery at the first pump, then one each DELIVER_S at most.
    assert 2 <= len(delivered) <= 1 + pumped_s / DELIVER_S, len(delivered)

    monitor.emit(event_row(monitor.now_ns(), None, "notice", text="now"))
    monitor.deliver()  # a view about to draw asks for everything so far
    assert '{"text": "now"}' in delivered[-1]["text"].to_pylist()
    n = len(delivered)
    monitor.emit(event_row(monitor.now_ns(), None, "notice", text="later"))
    monitor.deliver(when_due=True)  # just delivered: waits
    assert len(delivered) == n
    monitor.emit(pa.concat_batches([event_row(0, None, "notice", text="x")] * DELIVER_ROWS))
    monitor.deliver(when_due=True)  # not due by time, but DELIVER_ROWS rows wait
    assert len(delivered) == n + 1 and '{"text": "later"}' in delivered[-1]["text"].to_pylist()

    monitor.close({})
    rows = pa.Table.from_batches(delivered)
    cores = rows.filter(pc.equal(rows["kind"], "core"))
    procs = rows.filter(pc.and_(pc.equal(rows["kind"], "proc"), pc.equal(rows["name"], "cpu_percent")))
    core_times = np.unique(cores["t_ns"].to_numpy())
    proc_times = procs["t_ns"].to_numpy()
    assert len(core_times) >= 0.6 * 20 * pumped_s  # cores at sample_hz
    assert 2 <= len(proc_times) <= 1 + PROC_SAMPLE_HZ * pumped_s  # processes at most PROC_SAMPLE_HZ
    assert np.all(np.diff(core_times) > 0)
    # The recording holds the same samples, in time order.
    rec = open_recording(tmp_path / "m.arrow")
    table = rec.read_all()
    recorded = table.filter(pc.equal(table["kind"], "core"))["t_ns"].to_numpy()
    assert rec.complete and np.array_equal(np.unique(recorded), core_times)

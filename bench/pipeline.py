"""Benchmark 3: telemetry pipeline capacity, W = 1, 2, 8 synthetic producer processes.

Each producer is a real process using the real span API (`marlwatch.instrument`: preallocated
buffers, batch frames over a `multiprocessing` Pipe) and emits nested spans as fast as it can:
100 iterations of `sample { act, env_step }` per `tick()`. The monitor (this process) does
what `Run.pump` does with every frame: `wire.decode`, `collector.ProcStream.rows`, the real
`RecordingWriter` (zstd, flushed every 0.5 s) and `Metrics.add` (as the headless CLI and the
live view do). Figures: the span rate end to end (spans found in the file over the time from
the start signal to the last frame), the span counts sent vs recorded (they must be equal:
producers wait on a full pipe, nothing is dropped), the monitor's peak RSS and its CPU.

Flat out, producers are throttled only by the pipe and by the CPU they get, so the rate
measured is the highest rate that the pipeline sustains without loss on this machine at that
W. On a shared machine the producers' share of the CPU varies, so the monitor's CPU time per
span is given too: it does not depend on the load, and its inverse is what one core of monitor
could take.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

import psutil
from _common import main_for, row

TARGET = 1_000_000


def _producer(conn, slot: int, go, duration_s: float) -> None:
    from marlwatch import instrument

    tel = instrument.connect(conn, role="producer", slot=slot, pid=os.getpid())
    outer, act, env = tel.span("sample"), tel.span("sample/act"), tel.span("sample/env_step")
    go.wait()
    cpu0 = time.process_time()
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        for _ in range(100):
            with outer:
                with act:
                    pass
                with env:
                    pass
        tel.tick()
    tel.flush()
    tel.event("finished", spans=tel.spans_sent, cpu_s=time.process_time() - cpu0)
    tel.close()


def run_pipeline(workers: int, duration_s: float, path: Path, *, metrics: bool = True) -> dict:
    from marlwatch import wire
    from marlwatch.collector import ProcStream
    from marlwatch.metrics import Metrics
    from marlwatch.recording import RecordingWriter, RunInfo

    ctx = mp.get_context("spawn")
    go = ctx.Event()
    info = RunInfo(algo="synthetic", env="none", agents=0, workers=workers, seed=0, iterations=None,
                   procs={str(s): f"producer {s}" for s in range(1, workers + 1)})
    t_origin = time.perf_counter_ns()
    conns, procs, streams = {}, [], {}
    for slot in range(1, workers + 1):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_producer, args=(w, slot, go, duration_s), daemon=True)
        p.start()
        w.close()
        conns[r] = slot
        procs.append(p)
        streams[slot] = ProcStream(slot, t_origin)
    me = psutil.Process()
    m = Metrics(info) if metrics else None
    sent: dict[int, int] = {}
    producer_cpu = 0.0
    hello = 0
    rss_peak = me.memory_info().rss
    rss_start = rss_peak
    t_go = t_end = None
    cpu0 = None
    next_sample = 0.0
    with RecordingWriter(path, info) as writer:
        while conns:
            for c in wait(list(conns), timeout=0.1):
                slot = conns[c]
                try:
                    frame = c.recv_bytes()
                except (EOFError, OSError):
                    del conns[c]
                    continue
                msg = wire.decode(frame)
                if isinstance(msg, wire.Control):
                    if msg.message["type"] == "hello":
                        hello += 1
                        if hello == workers:
                            rss_start = me.memory_info().rss
                            cpu0 = me.cpu_times()
                            t_go = time.perf_counter()
                            go.set()
                    elif msg.message.get("name") == "finished":
                        sent[slot] = int(msg.message["spans"])
                        producer_cpu += float(msg.message["cpu_s"])
                    continue
                rows = streams[slot].rows(msg)
                if rows is not None:
                    writer.append(rows)
                    if m is not None:
                        m.add(rows)
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + 0.1
                rss_peak = max(rss_peak, me.memory_info().rss)
        t_end = time.perf_counter()
        cpu1 = me.cpu_times()
    for p in procs:
        p.join(timeout=10)
    import pyarrow.compute as pc

    from marlwatch.recording import open_recording

    recorded = sum(pc.sum(pc.equal(b.column("kind"), "span")).as_py() or 0 for b in open_recording(path).batches())
    elapsed = t_end - (t_go or t_end)
    cpu = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / elapsed if cpu0 and elapsed else float("nan")
    cpu_per_span = cpu * elapsed / recorded if recorded else float("nan")
    producer_per_span = producer_cpu / recorded if recorded else float("nan")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"workers": workers, "spans_sent": sum(sent.values()), "spans_recorded": recorded,
            "monitor_cpu_ns_per_span": cpu_per_span * 1e9,
            "monitor_capacity_one_core": 1.0 / cpu_per_span if cpu_per_span else float("nan"),
            "producer_cpu_ns_per_span": producer_per_span * 1e9,
            # What the machine could sustain with all its cores on this pipeline and nothing else.
            "idle_machine_capacity": cores / (cpu_per_span + producer_per_span) if recorded else float("nan"),
            "lossless": sum(sent.values()) == recorded and len(sent) == workers, "elapsed_s": elapsed,
            "rate": recorded / elapsed if elapsed else 0.0, "monitor_rss_peak": rss_peak,
            "monitor_rss_start": rss_start, "monitor_cpu": cpu, "file_bytes": path.stat().st_size}


def measure(quick: bool = False) -> dict:
    duration = 2.0 if quick else 4.0
    out: dict = {"duration_s": duration, "runs": []}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mw-pipe-") as tmp:
        for w in (1, 2, 8):
            r = run_pipeline(w, duration, Path(tmp) / f"w{w}.arrow")
            out["runs"].append(r)
            rows.append(row(f"pipeline W={w}: spans/s recorded", f"{r['rate'] / 1e6:.2f} M",
                            ">= 1 M", r["rate"] >= TARGET and r["lossless"],
                            f"sent {r['spans_sent']:,} recorded {r['spans_recorded']:,} "
                            f"({'no loss' if r['lossless'] else 'LOSS'}); monitor RSS peak "
                            f"{r['monitor_rss_peak'] / 2**20:.0f} MB (start {r['monitor_rss_start'] / 2**20:.0f}), "
                            f"CPU {100 * r['monitor_cpu']:.0f}%"))
            rows.append(row(f"pipeline W={w}: CPU per span, monitor + producer",
                            f"{r['monitor_cpu_ns_per_span']:.0f} + {r['producer_cpu_ns_per_span']:.0f} ns", "", None,
                            f"one monitor core takes {r['monitor_capacity_one_core'] / 1e6:.1f} M spans/s; all cores "
                            f"on this alone: {r['idle_machine_capacity'] / 1e6:.1f} M spans/s (load-independent)"))
        r = run_pipeline(2, duration, Path(tmp) / "w2-rec.arrow", metrics=False)
        out["recorder_only_w2"] = r
        rows.append(row("pipeline W=2, recorder only (no Metrics)", f"{r['rate'] / 1e6:.2f} M", "", None,
                        f"{'no loss' if r['lossless'] else 'LOSS'}, monitor CPU {100 * r['monitor_cpu']:.0f}%"))
    out["rows"] = rows
    return out


if __name__ == "__main__":
    raise SystemExit(main_for(measure))

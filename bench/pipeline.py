"""Benchmark 3: telemetry pipeline capacity, W = 1, 2, 8 synthetic producer processes.

Each producer is a real process using the real span API (`marlwatch.instrument`: preallocated
buffers, batch frames over a `multiprocessing` Pipe) and emits nested spans as fast as it can:
100 iterations of `sample { act, env_step }` per `tick()`. The monitor (this process) is the
real one (`marlwatch.monitor.Monitor`, driven by `marlwatch.runner.drive` as `marlwatch run`
drives it, with its core and process sampling), with `Metrics` listening as the headless CLI and
the live view do; the producers are started by a small launcher of this benchmark's own. Figures: the span rate end to end (spans found in the file over the time from
the start signal to the last frame), the span counts sent vs recorded (they must be equal:
producers wait on a full pipe, nothing is dropped), the monitor's peak RSS and its CPU.

Flat out, producers are throttled only by the pipe and by the CPU they get, so the rate
measured is the highest rate that the pipeline sustains without loss on this machine at that
W. On a shared machine the producers' share of the CPU varies, so the monitor's CPU time per
span is given too: it does not depend on the load, and its inverse is what one core of monitor
could take.

`--socket` (and `measure_socket`): the producers connect to the monitor's listener over TCP on
127.0.0.1 (the way Ray actors on other machines report: an authenticated socket, each answering
the monitor's clock requests) instead of pipes; 32 of them, as a cluster's worth of actors.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import psutil
from _common import main_for, row

TARGET = 1_000_000


def _producer(conn, slot: int, go, duration_s: float) -> None:
    from marlwatch import instrument

    if isinstance(conn, tuple):  # (address, key): over the monitor's listener
        tel = instrument.connect_monitor(conn[0], conn[1], role=f"producer {slot + 1}", pid=os.getpid())
    else:
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


class ProducerLauncher:
    """A launcher (marlwatch.launchers) for W synthetic producers, so the benchmark drives the real
    monitor with the same loop as `marlwatch run` (marlwatch.runner.drive)."""

    def __init__(self, workers: int, duration_s: float, socket: bool = False) -> None:
        self.workers, self.duration_s, self.socket = workers, duration_s, socket
        self.ctx = mp.get_context("spawn")
        self.go = self.ctx.Event()
        self.procs: list = []

    def run_info(self):
        from marlwatch.recording import RunInfo

        return RunInfo(algo="synthetic", env="none", agents=0, workers=self.workers, seed=0, iterations=None,
                       procs={str(s): f"producer {s + 1}" for s in range(self.workers)})

    def record_stem(self) -> str:
        return "pipeline"

    def describe(self) -> str:
        return f"{self.workers} synthetic producers"

    def start(self, monitor) -> None:
        if self.socket:
            key = os.urandom(32)
            address = monitor.listen("127.0.0.1:0", key)
            for i in range(self.workers):
                monitor.add_process(f"producer {i + 1}")  # the hello's role finds its slot
                p = self.ctx.Process(target=_producer, args=((address, key), i, self.go, self.duration_s),
                                     daemon=True)
                p.start()
                self.procs.append(p)
            return
        for i in range(self.workers):
            r, w = self.ctx.Pipe(duplex=False)
            p = self.ctx.Process(target=_producer, args=(w, i, self.go, self.duration_s), daemon=True)
            p.start()
            w.close()
            monitor.attach(monitor.add_process(f"producer {i + 1}", pid=p.pid), r)
            self.procs.append(p)

    def waitables(self) -> list:
        return []

    def poll(self, monitor, ready) -> None:
        for slot, p in enumerate(self.procs):
            if monitor.procs[slot].exitcode is None and not p.is_alive():
                monitor.process_exited(slot, p.exitcode)

    @property
    def running(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def request_stop(self, reason: str) -> None:
        pass  # producers stop after their duration

    def kill(self, monitor) -> None:
        for p in self.procs:
            p.join(timeout=10)
        self.poll(monitor, [])


def run_pipeline(workers: int, duration_s: float, path: Path, *, metrics: bool = True, socket: bool = False) -> dict:
    from marlwatch.metrics import Metrics
    from marlwatch.runner import Run, RunConfig, drive

    launcher = ProducerLauncher(workers, duration_s, socket)
    run = Run(RunConfig(record=str(path)), launcher=launcher)
    if metrics:
        run.listeners.append(Metrics(run.info).add)
    me = psutil.Process()
    sent: dict[int, int] = {}
    producer_cpu = 0.0
    state = {"rss_peak": me.memory_info().rss, "rss_start": 0, "t_go": None, "cpu0": None}
    policy = run.monitor.on_process_event

    def on_event(st, name: str, detail: dict) -> None:
        nonlocal producer_cpu
        if name == "finished":
            sent[st.slot] = int(detail["spans"])
            producer_cpu += float(detail["cpu_s"])
        policy(st, name, detail)

    run.monitor.on_process_event = on_event

    def every() -> None:
        state["rss_peak"] = max(state["rss_peak"], me.memory_info().rss)
        if not launcher.go.is_set() and all(st.state == "running" for st in run.procs.values()):
            state["rss_start"] = me.memory_info().rss
            state["cpu0"] = me.cpu_times()
            state["t_go"] = time.perf_counter()
            launcher.go.set()

    drive(run, every=every, period_s=0.1)
    t_end = time.perf_counter()
    cpu1 = me.cpu_times()
    import pyarrow.compute as pc

    from marlwatch.recording import open_recording

    recorded = sum(pc.sum(pc.equal(b.column("kind"), "span")).as_py() or 0 for b in open_recording(path).batches())
    cpu0, t_go = state["cpu0"], state["t_go"]
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
            "rate": recorded / elapsed if elapsed else 0.0, "monitor_rss_peak": state["rss_peak"],
            "monitor_rss_start": state["rss_start"], "monitor_cpu": cpu, "file_bytes": path.stat().st_size}


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


def measure_socket(quick: bool = False, workers: int = 32) -> dict:
    """32 producers over the listener (TCP on 127.0.0.1), as a cluster's actors report."""
    duration = 3.0 if quick else 6.0
    with tempfile.TemporaryDirectory(prefix="mw-pipe-") as tmp:
        r = run_pipeline(workers, duration, Path(tmp) / "socket.arrow", socket=True)
    r["duration_s"] = duration
    r["rows"] = [row(f"telemetry over the socket, {workers} producers: spans/s recorded", f"{r['rate'] / 1e6:.2f} M",
                     "no loss", r["lossless"],
                     f"sent {r['spans_sent']:,} recorded {r['spans_recorded']:,} "
                     f"({'no loss' if r['lossless'] else 'LOSS'}); monitor CPU {r['monitor_cpu_ns_per_span']:.0f} ns "
                     f"per span, RSS peak {r['monitor_rss_peak'] / 2**20:.0f} MB")]
    return r


if __name__ == "__main__":
    import sys

    if "--socket" in sys.argv:
        sys.argv.remove("--socket")
        raise SystemExit(main_for(measure_socket))
    raise SystemExit(main_for(measure))

"""Benchmark 2: what instrumentation costs a real training run, as an IPS ratio.

Real headless runs through `marlwatch.runner.Run` (learner + workers as processes, pipes, the
recording), alternating spans on / `--no-spans` (ON, OFF, OFF, ON, ON, OFF, ... so neither mode
always runs first), and the figure is the median of the per-pair ratios IPS_on / IPS_off - 1.
IPS is the main loop's steady rate, read from its iteration ticks (which both modes record)
after the first 20% of iterations, so start-up and the replay-buffer warm-up are left out.

On a shared 2-core machine run-to-run noise is several percent, far above the < 1% target, so
the table also gives the CPU time all processes spend per iteration (from the recording's
per-process CPU samples; less sensitive to other jobs than IPS), and an estimate that does not
depend on noise: spans per iteration on the busiest process x the measured ns per span
(benchmark 1) / that process's time per iteration.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from _common import drained_pipe, main_for, median, row, spread

TARGET = 0.01
# Short runs that reach the steady state quickly (MADDPG: updates start after 1024 transitions).
SETTINGS: dict[str, dict[str, str]] = {"maddpg": {"warmup": "1024", "batch_size": "256"}}
# Iterations per run (full, quick): about 15 s of training each on this machine.
ITERATIONS: dict[str, tuple[int, int]] = {"maddpg": (150, 100), "tom2c": (40, 25)}


def real_run(algo: str, spans: bool, iterations: int, record: Path, workers: int = 2, agents: int = 3,
             settings: dict[str, str] | None = None) -> dict:
    """One headless run, driven like `marlwatch run --headless`; its figures from Metrics."""
    from marlwatch.metrics import Metrics
    from marlwatch.runner import Run, RunConfig, drive

    run = Run(RunConfig(algo=algo, agents=agents, workers=workers, iterations=iterations, spans=spans,
                        record=str(record), settings=dict(settings or SETTINGS.get(algo, {}))))
    m = Metrics(run.info)
    run.listeners.append(m.add)
    t0 = time.monotonic()
    # The monitor's (this process's) CPU time, against the learner's iteration count, after every
    # pump: its steady-state cost per iteration, without the start-up (imports, spawning).
    me = psutil.Process()
    mon: list[tuple[int, float]] = []
    run.hooks.append(lambda final: final or mon.append((run.streams[0].iteration, sum(me.cpu_times()[:2]))))
    drive(run)
    if run.failure:
        raise RuntimeError(f"benchmark run failed: {run.failure}")
    ticks = m.iteration_times_ns()
    skip = len(ticks) // 5
    steady = (len(ticks) - 1 - skip) / ((ticks[-1] - ticks[skip]) / 1e9)
    (i0, c0), (i1, c1) = next(x for x in mon if x[0] >= skip), max(mon)
    monitor_cpu_s = (c1 - c0) / max(1, i1 - i0)
    snap = m.snapshot()
    cpu = cpu_per_iteration(record, int(ticks[skip]), int(ticks[-1]), len(ticks) - 1 - skip, run.cfg.sample_hz)
    return {"ips": float(steady), "cpu_s_per_iteration": cpu, "iterations": int(len(ticks)), "wall_s": time.monotonic() - t0,
            "monitor_cpu_s_per_iteration": monitor_cpu_s,
            "snapshot": snap, "spans": sum(p.count for p in snap.phases),
            "record": str(record)}


def cpu_per_iteration(record: str | Path, t0_ns: int, t1_ns: int, iterations: int, sample_hz: float) -> float:
    """CPU seconds all the run's processes spent per iteration between t0 and t1, from the
    recording's per-process CPU samples (each the CPU% since the one before: the monitor takes
    them min(sample_hz, PROC_SAMPLE_HZ) times a second). Unlike IPS it hardly depends on what else
    the machine runs, so it shows an overhead that noise hides."""
    import pyarrow.compute as pc

    from marlwatch.monitor import PROC_SAMPLE_HZ
    from marlwatch.recording import open_recording

    total = 0.0
    for b in open_recording(record).batches():
        t = b.column("t_ns")
        sel = pc.and_(pc.and_(pc.equal(b.column("kind"), "proc"), pc.equal(b.column("name"), "cpu_percent")),
                      pc.and_(pc.greater(t, t0_ns), pc.less_equal(t, t1_ns)))
        total += pc.sum(b.filter(sel).column("value")).as_py() or 0.0
    return total / 100.0 / min(sample_hz, PROC_SAMPLE_HZ) / max(1, iterations)


def spans_per_iteration(record: str | Path) -> dict[int, float]:
    """Spans per iteration of each process (slot), counted in the recording."""
    import pyarrow.compute as pc

    from marlwatch.recording import open_recording

    counts: dict[int, int] = {}
    iters: dict[int, int] = {}
    for b in open_recording(record).batches():
        for kind, into in (("span", counts), ("iter", iters)):
            sel = b.filter(pc.equal(b.column("kind"), kind))
            for d in pc.value_counts(sel.column("proc")).to_pylist():
                into[d["values"]] = into.get(d["values"], 0) + d["counts"]
    return {slot: counts.get(slot, 0) / n for slot, n in iters.items() if n}


def _estimate(per_iter: dict[int, float], ips: float, ns_per_span: float) -> float:
    """Span cost as a share of iteration time on the process with the most spans per iteration
    (every process runs one loop iteration per learner iteration)."""
    busiest = max(per_iter.values(), default=0.0)
    return busiest * ns_per_span * 1e-9 * ips


# Iterations per block in the within-run A/B: long enough (about 0.5 s of MADDPG here) that most
# of the monitor's work on a block's spans (they arrive up to ~0.45 s later: 0.25 s flush, 0.2 s
# pump) falls in the same block, short enough that the machine's load barely drifts in a pair.
AB_BLOCK = 20
# Iterations (full, quick): per-pair noise is ~2-3 % here, so 4000 iterations (~2 min) give a
# 95% interval of about +-0.4 %.
AB_ITERATIONS: dict[str, tuple[int, int]] = {"maddpg": (4000, 1200), "tom2c": (600, 240)}


def ab_run(algo: str, iterations: int, record: Path, block: int = AB_BLOCK, resamples: int = 2000) -> dict:
    """Spans on and off in alternating blocks of `block` iterations inside ONE run (learner and
    workers switch together at the start of an iteration), so both modes share the machine's
    load moment by moment. Figure: time per iteration on / off - 1 over (on, off) block pairs
    after the first 20%, with a 95% bootstrap interval over pairs."""
    from marlwatch.metrics import Metrics
    from marlwatch.runner import Run, RunConfig, drive

    run = Run(RunConfig(algo=algo, agents=3, workers=2, iterations=iterations, spans=True, spans_ab=block,
                        record=str(record), settings=dict(SETTINGS.get(algo, {}))))
    m = Metrics(run.info)
    run.listeners.append(m.add)
    drive(run)
    if run.failure:
        raise RuntimeError(f"benchmark run failed: {run.failure}")
    # Every iteration's latency, the first (start-up) too, so that index k is iteration k and the
    # blocks line up with the run's spans on/off switch; the first 20% are dropped below anyway.
    lat = np.diff(m.iteration_times_ns(), prepend=0).astype(np.float64)
    n_pairs = len(lat) // (2 * block)
    blocks = lat[: n_pairs * 2 * block].reshape(n_pairs, 2, block).sum(axis=2)  # [pair, on/off]
    blocks = blocks[n_pairs // 5:]
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(blocks), size=(resamples, len(blocks)))
    boot = blocks[pick, 0].sum(axis=1) / blocks[pick, 1].sum(axis=1) - 1.0
    return {"overhead": float(blocks[:, 0].sum() / blocks[:, 1].sum() - 1.0),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "pairs": int(len(blocks)), "block": block, "iterations": int(len(lat))}


def _in_situ_child(result, rounds: int) -> None:
    import os

    import torch

    from algorithms import get_algorithm, make_config
    from marlwatch import instrument

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    spec = get_algorithm("maddpg")
    cfg = make_config(spec, env="", agents=3, workers=2, seed=0, settings={})
    w, _drainer = drained_pipe()
    tel = instrument.connect(w, role="bench", slot=1)
    rollout = spec.rollout_cls(cfg, 1)
    for _ in range(20):  # warm up: first calls, allocator, env resets
        rollout.collect()
        instrument.tick()
    cpu: dict[bool, list[int]] = {True: [], False: []}
    spans0 = tel.spans_sent + tel.spans_buffered
    for i in range(rounds):
        on = (i // 5) % 2 == 0
        tel.spans_enabled = on
        t = time.process_time_ns()
        rollout.collect()
        instrument.tick()
        cpu[on].append(time.process_time_ns() - t)
    spans = tel.spans_sent + tel.spans_buffered - spans0
    instrument.disconnect()
    result.send({"on": cpu[True], "off": cpu[False], "spans_per_collect": spans / len(cpu[True])})


def in_situ(quick: bool = False) -> dict:
    """What a span costs inside MADDPG's real rollout, where torch and the environment run between
    spans: the CPU time of `collect()` (50 steps) with spans on and off in alternating blocks of 5,
    in one pinned process with no monitor (its pipe is drained by another). The span-cost
    benchmark's tight loop keeps everything in cache; this does not."""
    rounds = 200 if quick else 600
    ctx = mp.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_in_situ_child, args=(w, rounds))
    child.start()
    w.close()
    got = r.recv()
    child.join()
    on, off = np.array(got["on"], np.float64), np.array(got["off"], np.float64)
    extra = on.mean() / off.mean() - 1.0
    spans = got["spans_per_collect"]
    per_span_ns = (on.mean() - off.mean()) / spans
    # A 95% bootstrap interval: with a C span the difference is within the collects' own scatter.
    rng = np.random.default_rng(0)
    boot = (rng.choice(on, (2000, len(on))).mean(axis=1) - rng.choice(off, (2000, len(off))).mean(axis=1)) / spans
    return {"cpu_on_ms": on.mean() / 1e6, "cpu_off_ms": off.mean() / 1e6, "extra": float(extra),
            "spans_per_collect": spans, "ns_per_span_in_situ": float(per_span_ns),
            "ns_per_span_in_situ_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}


def available_algos() -> list[str]:
    from algorithms import ALGORITHMS

    return [a for a in ("maddpg", "tom2c") if a in ALGORITHMS]


def measure(quick: bool = False, algos: list[str] | None = None, keep: Path | None = None,
            ns_per_span: float | None = None) -> dict:
    from marlwatch.outputs import atomic_output

    pairs = 2 if quick else 4
    algos = algos or available_algos()
    if ns_per_span is None:
        import span_cost

        ns_per_span = span_cost.measure(quick=True)["ns_per_span_by_name"]
    out: dict = {"pairs": pairs, "iterations": ITERATIONS, "settings": SETTINGS, "ns_per_span": ns_per_span,
                 "algos": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mw-bench-") as tmp:
        for algo in algos:
            iterations = ITERATIONS.get(algo, (50, 30))[1 if quick else 0]
            on: list[float] = []
            off: list[float] = []
            cpu_on: list[float] = []
            cpu_off: list[float] = []
            mon_on: list[float] = []
            mon_off: list[float] = []
            rec_on = None
            for i in range(pairs):
                order = (True, False) if i % 2 == 0 else (False, True)
                got = {}
                for spans in order:
                    path = Path(tmp) / f"{algo}-{i}-{'on' if spans else 'off'}.arrow"
                    r = real_run(algo, spans, iterations, path)
                    got[spans] = r["ips"]
                    (cpu_on if spans else cpu_off).append(r["cpu_s_per_iteration"])
                    (mon_on if spans else mon_off).append(r["monitor_cpu_s_per_iteration"])
                    if spans and rec_on is None:
                        rec_on = r
                        if keep is not None and algo == "maddpg":  # what the size benchmark measures
                            with atomic_output(keep, binary=True) as f:
                                f.write(path.read_bytes())
                on.append(got[True])
                off.append(got[False])
            ratios = [a / b - 1.0 for a, b in zip(on, off, strict=True)]
            med = median(ratios)
            lo, hi = spread(ratios)
            per_iter = spans_per_iteration(rec_on["record"])
            est = _estimate(per_iter, rec_on["ips"], ns_per_span)
            noise = float(np.std(off) / np.mean(off)) if len(off) > 1 else float("nan")
            out["algos"][algo] = {"ips_on": on, "ips_off": off, "overhead_median": -med, "ratio_min_max": [lo, hi],
                                  "off_cv": noise, "estimated_overhead": est,
                                  "spans_per_iteration_by_slot": per_iter}
            # When pairs disagree by more than the target, the measurement cannot tell: say so.
            conclusive = (hi - lo) < 2 * TARGET
            rows.append(row(f"overhead {algo}: IPS on/off - 1 (measured)", f"{100 * med:+.2f}%", "> -1%",
                            (-med < TARGET) if conclusive else None,
                            ("" if conclusive else "inconclusive: noise > target; ") +
                            f"median of {pairs} interleaved pairs, range {100 * lo:+.1f}..{100 * hi:+.1f}%, "
                            f"IPS on {median(on):.2f} off {median(off):.2f}, run-to-run CV {100 * noise:.1f}%"))
            cpu_ratios = [a / b - 1.0 for a, b in zip(cpu_on, cpu_off, strict=True) if b > 0]
            clo, chi = spread(cpu_ratios)
            out["algos"][algo].update(cpu_s_per_iteration_on=cpu_on, cpu_s_per_iteration_off=cpu_off,
                                      cpu_overhead_median=median(cpu_ratios))
            rows.append(row(f"overhead {algo}: CPU s/iteration on/off - 1", f"{100 * median(cpu_ratios):+.2f}%",
                            "< 1%", None if (chi - clo) >= 2 * TARGET else median(cpu_ratios) < TARGET,
                            f"all processes' CPU time per iteration (psutil samples), range {100 * clo:+.1f}.."
                            f"{100 * chi:+.1f}%: less load-dependent than IPS"))
            ab = ab_run(algo, AB_ITERATIONS.get(algo, (200, 100))[1 if quick else 0], Path(tmp) / f"{algo}-ab.arrow")
            out["algos"][algo]["ab_in_one_run"] = ab
            lo_ab, hi_ab = ab["ci95"]
            rows.append(row(f"overhead {algo}: A/B in one run, time/iteration on/off - 1",
                            f"{100 * ab['overhead']:+.2f}%", "< 1%",
                            None if hi_ab - lo_ab >= 2 * TARGET else hi_ab < TARGET,
                            f"95% CI {100 * lo_ab:+.2f}..{100 * hi_ab:+.2f}% over {ab['pairs']} pairs of "
                            f"{ab['block']}-iteration blocks (spans switched on/off inside one run)"))
            # The monitor's work on a block's spans can land in the next block, where the A/B does
            # not charge it. Its whole extra CPU, charged to the iteration as if none of it ran on
            # a spare core, bounds what the A/B can have missed.
            extra_mon = median(mon_on) - median(mon_off)
            iteration_s = 1.0 / median(on)
            bound = ab["overhead"] + max(0.0, extra_mon) / iteration_s
            out["algos"][algo].update(monitor_cpu_s_per_iteration_on=mon_on, monitor_cpu_s_per_iteration_off=mon_off,
                                      upper_bound=bound)
            rows.append(row(f"overhead {algo}: monitor CPU per iteration, on - off",
                            f"{1e3 * extra_mon:+.3f} ms", "",
                            None, f"median of {pairs}: on {1e3 * median(mon_on):.2f} ms, off "
                            f"{1e3 * median(mon_off):.2f} ms per iteration of {1e3 * iteration_s:.1f} ms "
                            f"({100 * extra_mon / iteration_s:+.2f}% of it)"))
            rows.append(row(f"overhead {algo}: A/B + all extra monitor CPU (upper bound)", f"{100 * bound:+.2f}%",
                            "< 1%", None if hi_ab - lo_ab >= 2 * TARGET else bound < TARGET,
                            "the monitor's extra CPU charged in full to the training's iteration time"))
            rows.append(row(f"overhead {algo}: estimated from span cost", f"{100 * est:.3f}%", "< 1%", est < TARGET,
                            f"busiest process {max(per_iter.values()):.0f} spans/iteration x {ns_per_span:.0f} ns "
                            f"at {rec_on['ips']:.1f} IPS"))
    ins = in_situ(quick)
    out["in_situ"] = ins
    lo_ns, hi_ns = ins["ns_per_span_in_situ_ci95"]
    rows.append(row("span cost inside MADDPG's rollout (ns, in situ)", f"{ins['ns_per_span_in_situ']:.0f}", "",
                    None, f"95% CI {lo_ns:.0f}..{hi_ns:.0f} ns; collect() CPU on {ins['cpu_on_ms']:.2f} ms vs off "
                    f"{ins['cpu_off_ms']:.2f} ms ({100 * ins['extra']:+.2f}%), {ins['spans_per_collect']:.0f} spans "
                    f"per collect; tight loop {ns_per_span:.0f} ns"))
    out["rows"] = rows
    return out


if __name__ == "__main__":
    raise SystemExit(main_for(measure))

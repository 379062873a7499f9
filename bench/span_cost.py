"""Benchmark 1: the cost of one span on the hot path, in ns.

A real `Telemetry` ships its batches through a real `multiprocessing` Pipe that another process
drains (as the monitor would), so buffer flushes and the pipe write are in the figure, amortised
over the spans of a batch. The cost of the bare loop is measured in the same way and subtracted.
The default span implementation is measured (C where it was built), then the Python fallback.
Figures: `with s:` on a span object held by the caller (the built-in algorithms do this through
`span = instrument.span` and a name, so both forms are measured), a nested pair, `tick()`,
spans switched off (`--no-spans`), and the floor: two `perf_counter_ns` reads.
"""

from __future__ import annotations

import time

from _common import drained_pipe, main_for, median, row, spread

TARGET_NS = 500


def _timeit(fn, n: int) -> float:
    t0 = time.perf_counter_ns()
    fn(n)
    return (time.perf_counter_ns() - t0) / n


def _cases(implementation: str, n: int, repeats: int) -> tuple[dict[str, list[float]], int]:
    """Every case, `repeats` times, with spans of one implementation; ns per span (loop subtracted)."""
    from marlwatch import instrument

    w, drainer = drained_pipe()
    tel = instrument.connect(w, implementation=implementation, role="bench", slot=0)
    try:
        sp = tel.span("sample/env_step")
        outer, inner = tel.span("update"), tel.span("update/comm/gnn")
        span = instrument.span
        now = time.perf_counter_ns

        def empty(k: int) -> None:
            for _ in range(k):
                pass

        def cached(k: int) -> None:
            for _ in range(k):
                with sp:
                    pass

        def by_name(k: int) -> None:
            for _ in range(k):
                with span("sample/env_step"):
                    pass

        def nested(k: int) -> None:
            for _ in range(k // 2):
                with outer:
                    with inner:
                        pass

        def ticks(k: int) -> None:
            tick = instrument.tick
            for _ in range(k):
                tick()

        def clocks(k: int) -> None:
            for _ in range(k):
                now()
                now()

        def off(k: int) -> None:
            with instrument.spans_off():
                for _ in range(k):
                    with span("sample/env_step"):
                        pass

        cases = {"cached": cached, "by_name": by_name, "nested": nested, "tick": ticks, "clocks": clocks, "off": off}
        samples: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(repeats):
            # Interleaved: each repeat measures every case and its own empty loop right after.
            for name, fn in cases.items():
                base = _timeit(empty, n)
                samples[name].append(_timeit(fn, n) - base)
        sent = tel.spans_sent
    finally:
        instrument.disconnect()
        drainer.join(timeout=5)
        if drainer.is_alive():
            drainer.kill()
    return samples, sent


def measure(quick: bool = False) -> dict:
    from marlwatch import instrument

    n = 200_000 if quick else 1_000_000
    repeats = 5 if quick else 9
    default = instrument.DEFAULT_IMPLEMENTATION
    samples, sent = _cases(default, n, repeats)
    res = {k: median(v) for k, v in samples.items()}
    best = {k: min(v) for k, v in samples.items()}
    lo, hi = spread(samples["by_name"])
    out = {
        "implementation": default,
        "ns_per_span_cached": res["cached"],
        "ns_per_span_by_name": res["by_name"],
        "ns_per_span_nested": res["nested"],
        "ns_per_tick": res["tick"],
        "ns_per_span_off": res["off"],
        "ns_two_clock_reads": res["clocks"],
        "by_name_min_max": [lo, hi],
        "ns_per_span_by_name_min": best["by_name"],
        "spans_shipped": sent,
        "n": n,
        "repeats": repeats,
    }
    ratio = res["by_name"] / res["clocks"]
    out["ratio_to_floor"] = ratio
    out["rows"] = [
        row(f"span cost, span(name), {default} spans (ns)", f"{res['by_name']:.0f}", f"< {TARGET_NS}",
            res["by_name"] < TARGET_NS, f"median of {repeats}, range {lo:.0f}-{hi:.0f}; real Pipe drained by a process"),
        row("span cost, held span object (ns)", f"{res['cached']:.0f}", f"< {TARGET_NS}", res["cached"] < TARGET_NS),
        row("span cost, nested pair, per span (ns)", f"{res['nested']:.0f}", f"< {TARGET_NS}",
            res["nested"] < TARGET_NS),
        row("tick() (ns)", f"{res['tick']:.0f}"),
        row("span with --no-spans (ns)", f"{res['off']:.0f}"),
        row("floor: two clock reads (ns)", f"{res['clocks']:.0f}", "", None,
            "~75-90 ns on this machine when idle: a higher floor means a loaded machine"),
        row("span cost / floor", f"{ratio:.1f}x", "", None, "load-independent; x 85 ns = the idle-machine cost"),
    ]
    if default != "python":
        # What a machine without the C spans (no compiler at install, not Linux) pays instead.
        py, _ = _cases("python", n, repeats)
        py_by_name, py_off = median(py["by_name"]), median(py["off"])
        out["python"] = {"ns_per_span_by_name": py_by_name, "ns_per_span_off": py_off,
                         "ratio_to_floor": py_by_name / median(py["clocks"])}
        out["rows"].append(row("span cost, span(name), Python spans (fallback) (ns)", f"{py_by_name:.0f}",
                               f"< {TARGET_NS}", py_by_name < TARGET_NS,
                               f"spans off {py_off:.0f} ns; {py_by_name / median(py['clocks']):.1f}x the floor"))
    return out


if __name__ == "__main__":
    raise SystemExit(main_for(measure))

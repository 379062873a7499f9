"""Every benchmark, one command: `python bench/run_all.py [--quick] [--json] [--only NAME ...]`.

Prints one table (figure, value, target, met, note) and, with --json, every figure as JSON on
stdout (the table then goes to stderr). Order: span cost first (the overhead estimate uses it),
the pipeline and the 10M-span analysis, then the real runs of the overhead benchmark (its first
instrumented MADDPG recording is what the size benchmark measures), and the live app's cost when
bench/bench_app.py exists. docs/benchmarks.md has the figures measured on the project machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import BENCH, compile_bytecode, machine, print_table, row

# The pipeline and analysis benchmarks go before the real runs import torch, so that the
# monitor's RSS they report is not inflated by it.
ALL = ["span_cost", "pipeline", "analysis", "overhead", "autophases", "size", "app", "first_screen", "ray"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter runs (a few minutes)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON on stdout")
    p.add_argument("--only", nargs="+", choices=ALL, default=ALL, help="run only these benchmarks")
    a = p.parse_args(argv)
    compile_bytecode()
    table_out = sys.stderr if a.json else sys.stdout
    results: dict = {"machine": machine(), "quick": a.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows: list[dict] = []
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mw-bench-all-") as tmp:
        kept = Path(tmp) / "maddpg.arrow"
        ns_per_span = None
        for name in a.only:
            t0 = time.monotonic()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                if name == "span_cost":
                    import span_cost

                    r = span_cost.measure(a.quick)
                    ns_per_span = r["ns_per_span_by_name"]
                elif name == "overhead":
                    import overhead

                    r = overhead.measure(a.quick, keep=kept, ns_per_span=ns_per_span)
                elif name == "autophases":
                    import autophase_cost

                    r = autophase_cost.measure(a.quick)
                elif name == "size":
                    import size

                    r = size.measure(a.quick, record=kept if kept.exists() else None)
                elif name == "pipeline":
                    import pipeline

                    r = pipeline.measure(a.quick)
                elif name == "analysis":
                    import analysis

                    r = analysis.measure(a.quick)
                elif name == "first_screen":
                    import first_screen

                    r = first_screen.measure(a.quick)
                elif name == "ray":
                    if importlib.util.find_spec("ray") is None:
                        r = {"rows": [row("Ray backend", "not measured", "", None, "ray not installed: .[ray]")]}
                    else:
                        import ray_backend

                        r = ray_backend.measure(a.quick)
                else:
                    import bench_app

                    r = bench_app.measure(a.quick)
            except Exception as e:  # noqa: BLE001 - one failed benchmark must not hide the others
                r = {"error": f"{type(e).__name__}: {e}", "rows": [row(name, "FAILED", "", False, str(e)[:120])]}
            r["seconds"] = round(time.monotonic() - t0, 1)
            results[name] = r
            rows += r["rows"]
    results["seconds"] = round(time.monotonic() - t_all, 1)
    results["rows"] = rows
    m = results["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, load {m['load_avg_1m']} at start; "
          f"{'quick' if a.quick else 'full'} run, {results['seconds']:.0f} s", file=table_out)
    print_table(rows, file=table_out)
    if a.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    raise SystemExit(main())

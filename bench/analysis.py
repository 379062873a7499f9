"""Benchmark 5: `summary`, `diff` and replay's jumps on recordings of 10 million spans (and 100M),
side by side with DuckDB and polars on the same file.

The recording is synthetic but written by the real `RecordingWriter` in the batches a run
writes (65,536 rows at most, zstd): a learner and two workers with MADDPG's phase tree, span
durations drawn log-normal, one `iter` row per process iteration, 10 Hz core samples, and the
counters MADDPG reports (six losses an update, `episodes` and `episode_return` for each
worker's episode: ten rows an iteration, as in a real run). Every
figure comes from a fresh process (`python -m marlwatch summary FILE --json`, or a script for
DuckDB, polars and replay): its wall time (interpreter start and imports included), its CPU
time and its peak RSS (`ru_maxrss`); the child also reports the time after its imports.

DuckDB and polars answer the same question as `summary --json` does per phase: total, count,
p50/p95/p99 of span durations. DuckDB scans the stream through pyarrow (`GROUP BY name` with
`quantile_cont`), polars reads it with `read_ipc_stream` and `group_by().agg(quantile)`. Both
are bench-only dependencies (`pip install -e .[bench]`); a missing one makes its row say so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, main_for, row

SUMMARY_S = 0.3  # issue 14: summary --json and the end of replay of 10M spans
SUMMARY_BYTES = 200 << 20
DUCKDB_RATIO = 5.0
DIFF_S = 1.0
SEEK_S = 0.3

# (slot, name, parent, spans per iteration, median duration ns)
PATTERN = [
    (0, "sync/broadcast", None, 1, 8_000_000), (0, "sync/gather", None, 1, 50_000_000),
    (0, "update", None, 1, 20_000_000), (0, "update/store", "update", 1, 150_000),
    (0, "update/sample_batch", "update", 1, 200_000), (0, "update/comm/joint_inputs", "update", 3, 700_000),
    (0, "update/critic", "update", 3, 1_000_000), (0, "update/actor", "update", 3, 1_300_000),
    (0, "update/target", "update", 1, 300_000),
]
for _w in (1, 2):
    PATTERN += [
        (_w, "sync/wait", None, 1, 30_000_000), (_w, "sync/load_weights", None, 1, 400_000),
        (_w, "sample", None, 1, 30_000_000), (_w, "sample/act", "sample", 50, 80_000),
        (_w, "sample/env_step", "sample", 50, 200_000), (_w, "sample/store", "sample", 50, 4_000),
        (_w, "sync/send", None, 1, 300_000),
    ]
SPANS_PER_ITER = sum(p[3] for p in PATTERN)


def generate(path: Path, spans: int, seed: int = 0) -> dict:
    """Write a synthetic recording of about `spans` spans with the real writer."""
    import pyarrow as pa

    from marlwatch.collector import _batch, _const, core_rows
    from marlwatch.recording import COUNTER, ITER, KIND_TYPE, NAME_TYPE, SPAN, RecordingWriter, RunInfo

    rng = np.random.default_rng(seed)
    names = sorted({p[1] for p in PATTERN})
    name_idx = {n: i for i, n in enumerate(names)}
    dictionary = pa.array(names, pa.string())
    slot = np.concatenate([np.full(p[3], p[0], np.int16) for p in PATTERN])
    name = np.concatenate([np.full(p[3], name_idx[p[1]]) for p in PATTERN])
    parent = np.concatenate([np.full(p[3], name_idx[p[2]] if p[2] else -1) for p in PATTERN])
    median_ns = np.concatenate([np.full(p[3], p[4], np.float64) for p in PATTERN])
    info = RunInfo(algo="maddpg", env="simple_spread", agents=3, workers=2, seed=seed, iterations=None, cores=2,
                   procs={"0": "learner", "1": "worker 1", "2": "worker 2"}, pinning={"0": 0, "1": 1, "2": 0})
    iters_per_batch = max(1, 60_000 // SPANS_PER_ITER)
    iteration_ns = 100_000_000
    it = 0
    written = 0
    t0 = time.perf_counter()

    def phases(ids: np.ndarray) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(ids, NAME_TYPE.index_type, mask=ids < 0), dictionary)

    # (slot, name) of each iteration's counter rows: the learner's losses, the workers' episodes
    gauges = [(0, f"loss/{net}_{a}") for a in range(3) for net in ("critic", "actor")]
    gauges += [(w, n) for w in (1, 2) for n in ("episodes", "episode_return")]
    gauge_slot = np.array([g[0] for g in gauges], np.int16)
    gauge_names = pa.array([g[1] for g in gauges], pa.string())

    with RecordingWriter(path, info, overwrite=True) as w:  # path: our own temporary name
        while written < spans:
            k = iters_per_batch
            n = k * SPANS_PER_ITER
            iters = np.repeat(np.arange(it, it + k), SPANS_PER_ITER)
            dur = (np.tile(median_ns, k) * rng.lognormal(0.0, 0.5, n)).astype(np.int64)
            start = iters * iteration_ns + rng.integers(0, iteration_ns // 2, n)
            order = np.lexsort((start, np.tile(slot, k)))
            cols = dict(
                kind=_const(SPAN, n, KIND_TYPE), proc=pa.array(np.tile(slot, k)[order]),
                name=phases(np.tile(name, k)[order]), parent=phases(np.tile(parent, k)[order]),
                t_ns=pa.array(start[order]), dur_ns=pa.array(dur[order]), iter=pa.array(iters[order]),
            )
            w.append(_batch(n, **cols))
            ticks = np.arange(it + 1, it + k + 1)
            for s in (0, 1, 2):
                w.append(_batch(k, kind=_const(ITER, k, KIND_TYPE), proc=_const(s, k, pa.int16()),
                                t_ns=pa.array(ticks * iteration_ns), iter=pa.array(ticks)))
            g = k * len(gauges)
            values = np.where(np.tile(gauge_names.to_numpy(zero_copy_only=False) == "episodes", k), 1.0,
                              rng.normal(0.0, 1.0, g))
            w.append(_batch(g, kind=_const(COUNTER, g, KIND_TYPE), proc=pa.array(np.tile(gauge_slot, k)),
                            name=pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(len(gauges)), k),
                                                                         NAME_TYPE.index_type), gauge_names),
                            t_ns=pa.array(np.repeat(np.arange(it, it + k) * iteration_ns + iteration_ns // 2,
                                                    len(gauges))),
                            value=pa.array(values)))
            for j in range(k):  # 10 Hz core samples: one per 100 ms iteration
                w.append(core_rows(int((it + j) * iteration_ns), [float(rng.uniform(50, 100)) for _ in range(2)]))
            w.flush()
            it += k
            written += n
        w.close(t_ns=it * iteration_ns)
    return {"spans": written, "iterations": it, "bytes": path.stat().st_size,
            "generate_s": time.perf_counter() - t0}


# Peak RSS from /proc (VmHWM, this process's own): ru_maxrss survives exec, so a child started by a
# large parent (this one, after writing 10M spans) would report the parent's peak.
_STATS = r"""
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(json.dumps({"code": code, "in_process_s": time.perf_counter() - t0, "after_imports_s": time.perf_counter() - t1,
                  "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss": hwm, **extra}), file=sys.stderr)
"""

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from marlwatch.cli import main
import pyarrow, numpy
t1 = time.perf_counter()
code = main(sys.argv[1:])
sys.stdout.flush()
extra = {}
""" + _STATS

# What `marlwatch replay` does under its UI: open, jump to the end, back to 10%, forward to 60%.
_REPLAY_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from marlwatch.playback import Playback
from marlwatch.recording import open_recording
t1 = time.perf_counter()
pb = Playback.from_recording(open_recording(sys.argv[1]))
extra = {"open_s": time.perf_counter() - t1}
for label, at in (("end", 1.0), ("back_10pct", 0.1), ("forward_60pct", 0.6), ("back_start", 0.0), ("end_again", 1.0)):
    t = time.perf_counter()
    pb.seek_s(pb.duration_s * at)
    snap = pb.snapshot()
    extra[label + "_s"] = time.perf_counter() - t
code = 0 if pb.at_end and snap.complete else 1
extra["spans"] = sum(p.count for p in snap.phases)
""" + _STATS

_DUCKDB_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import duckdb, pyarrow as pa
t1 = time.perf_counter()
reader = pa.ipc.open_stream(sys.argv[1])
rows = duckdb.sql("select name, sum(dur_ns), count(*), quantile_cont(dur_ns, [0.5, 0.95, 0.99]) "
                  "from reader where kind = 'span' group by name").fetchall()
code = 0
extra = {"spans": sum(r[2] for r in rows), "phases": len(rows)}
""" + _STATS

_POLARS_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import polars as pl
t1 = time.perf_counter()
df = pl.read_ipc_stream(sys.argv[1])
out = (df.filter(pl.col("kind") == "span").group_by("name")
       .agg(pl.col("dur_ns").sum().alias("total"), pl.len().alias("count"),
            *[pl.col("dur_ns").quantile(q).alias(f"p{q}") for q in (0.5, 0.95, 0.99)]))
code = 0
extra = {"spans": int(out["count"].sum()), "phases": out.height}
""" + _STATS


def time_command(*argv: str, child: str = _CHILD) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", child, *argv], capture_output=True, text=True, cwd=REPO,
                       timeout=1800)
    wall = time.perf_counter() - t0
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "{}"
    try:
        stats = json.loads(last)
    except ValueError:
        stats = {"code": p.returncode, "error": p.stderr[-500:]}
    return {"wall_s": wall, **stats, "stdout": p.stdout}


def cached(spans: int, seed: int = 0) -> tuple[Path, dict | None]:
    """The synthetic recording of `spans` spans (written once, kept in the temp directory; written
    anew when the writer's or the generator's code changed, which the name says with a hash of it)."""
    import hashlib
    import inspect

    from marlwatch import aggregates, recording, schema

    writer = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (recording, aggregates, schema))
                            + inspect.getsource(generate).encode())
    name = f"marlwatch-bench-f{recording.FORMAT_VERSION}-{writer.hexdigest()[:8]}-{spans}-s{seed}.arrow"
    path = Path(tempfile.gettempdir()) / name
    gen = None
    if not path.exists():
        gen = generate(path.with_suffix(".tmp"), spans, seed)
        os.replace(path.with_suffix(".tmp"), path)
    return path, gen


def _walls(out: dict, key: str) -> str:
    return ", ".join(f"{w:.2f}" for w in out["walls"][key]) + " s"


def _mb(stats: dict) -> str:
    return f"{stats.get('maxrss', 0) / 2**20:.0f} MB"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def measure(quick: bool = False, spans: int | None = None, big: int | None = None) -> dict:
    """`quick`: 2M spans and no 100M row; `big`: the span count of the large row (default 100M,
    only when not quick)."""
    spans = spans or (2_000_000 if quick else 10_000_000)
    path, gen = cached(spans)
    size = path.stat().st_size
    at = f"{spans / 1e6:.0f}M spans"
    out: dict = {"spans": spans, "file": str(path), "file_bytes": size, "generated": gen}
    rows = []

    # The machine is shared: summary, DuckDB and diff run `repeats` times, interleaved, and each
    # figure is the run with the least wall time (the one the other jobs disturbed least); the
    # ratio to DuckDB is of those, and of their CPU times.
    repeats = 1 if quick else 3
    runs: dict[str, list[dict]] = {"summary": [], "duckdb": [], "diff": []}
    path_b, _ = cached(spans, seed=1)
    for _ in range(repeats):
        runs["summary"].append(time_command("summary", str(path), "--json"))
        if _has("duckdb"):
            runs["duckdb"].append(time_command(str(path), child=_DUCKDB_CHILD))
        runs["diff"].append(time_command("diff", str(path), str(path_b), "--json"))
    out["walls"] = {k: [r["wall_s"] for r in v] for k, v in runs.items()}
    s = dict(min(runs["summary"], key=lambda r: r["wall_s"]))
    summary = json.loads(s.pop("stdout") or "{}")
    out["summary"] = s
    counted = sum(p["count"] for p in summary.get("phases", {}).values())
    ok = s.get("code") == 0 and counted > 0.99 * spans
    rows.append(row(f"summary --json, {at}: wall / after imports / CPU / peak RSS",
                    f"{s['wall_s']:.2f} / {s.get('after_imports_s', float('nan')):.2f} / "
                    f"{s.get('cpu_s', float('nan')):.2f} s / {_mb(s)}",
                    f"< {SUMMARY_S} s, < {SUMMARY_BYTES >> 20} MB",
                    ok and s["wall_s"] < SUMMARY_S and s.get("maxrss", 1 << 40) < SUMMARY_BYTES,
                    f"best of {repeats} fresh processes (walls {_walls(out, 'summary')}); "
                    f"file {size / 2**20:.0f} MB ({size / spans:.2f} B/span); "
                    f"{counted:,} spans summarised (first iterations are start-up)"))
    e = time_command("summary", str(path), "--json", "--exact")
    e.pop("stdout")
    out["summary_exact"] = e
    rows.append(row(f"summary --json --exact (every span read), {at}", f"{e['wall_s']:.2f} s / {_mb(e)}", "", None,
                    f"after imports {e.get('after_imports_s', float('nan')):.2f} s"))

    for name, child in (("duckdb", _DUCKDB_CHILD), ("polars", _POLARS_CHILD)):
        if not _has(name):
            rows.append(row(f"{name}, same file", "not installed", "", None, "pip install -e .[bench]"))
            continue
        d = dict(min(runs["duckdb"], key=lambda r: r["wall_s"])) if name == "duckdb" \
            else time_command(str(path), child=child)
        d.pop("stdout")
        out[name] = d
        ratio = d["wall_s"] / s["wall_s"]
        cpu_ratio = d.get("cpu_s", math.nan) / max(s.get("cpu_s", math.nan), 1e-9)
        target = f">= {DUCKDB_RATIO:.0f}x faster" if name == "duckdb" else ""
        rows.append(row(f"{name} GROUP BY phase with quantiles, {at}: wall / peak RSS; summary is Nx faster",
                        f"{d['wall_s']:.2f} s / {_mb(d)}; {ratio:.1f}x (CPU {cpu_ratio:.1f}x)", target,
                        (ratio >= DUCKDB_RATIO) if name == "duckdb" else None,
                        f"after imports {d.get('after_imports_s', float('nan')):.2f} s vs summary's "
                        f"{s.get('after_imports_s', float('nan')):.2f} s "
                        f"({d.get('after_imports_s', 0) / max(s.get('after_imports_s', 1), 1e-9):.1f}x); "
                        + (f"best of {repeats} interleaved with summary (walls {_walls(out, 'duckdb')}); "
                           if name == "duckdb" else "one run; ") +
                        f"{d.get('spans', 0):,} spans"))

    d = dict(min(runs["diff"], key=lambda r: r["wall_s"]))
    out["diff"] = {k: v for k, v in d.items() if k != "stdout"}
    rows.append(row(f"diff of two {at} recordings: wall / after imports / peak RSS",
                    f"{d['wall_s']:.2f} / {d.get('after_imports_s', float('nan')):.2f} s / {_mb(d)}",
                    f"< {DIFF_S:.0f} s", d.get("code") == 0 and d["wall_s"] < DIFF_S,
                    f"best of {repeats} (walls {_walls(out, 'diff')}); CPU {d.get('cpu_s', math.nan):.2f} s; "
                    "same intervals as diff --exact (tests/test_format.py checks it)"))

    r = time_command(str(path), child=_REPLAY_CHILD)
    r.pop("stdout")
    out["replay"] = r
    seeks = {k[:-2]: r.get(k, float("nan")) for k in ("end_s", "back_10pct_s", "forward_60pct_s", "back_start_s",
                                                         "end_again_s")}
    worst = max(seeks.values())
    rows.append(row(f"replay of {at}: jumps to the end, back to 10%, to 60%, to the start, to the end",
                    " / ".join(f"{v:.2f}" for v in seeks.values()) + " s",
                    f"each < {SEEK_S} s", r.get("code") == 0 and worst < SEEK_S,
                    f"open (index from batch headers) {r.get('open_s', float('nan')):.2f} s; peak RSS {_mb(r)}"))

    if not quick:
        big = big or 100_000_000
        bpath, bgen = cached(big)
        out["big_generated"] = bgen
        b = time_command("summary", str(bpath), "--json")
        b.pop("stdout")
        out["summary_big"] = b
        rows.append(row(f"summary --json, {big / 1e6:.0f}M spans: wall / after imports / peak RSS",
                        f"{b['wall_s']:.2f} / {b.get('after_imports_s', float('nan')):.2f} s / {_mb(b)}", "", None,
                        f"file {bpath.stat().st_size / 2**30:.2f} GB; cost grows with batches and iterations, "
                        f"not spans"))
    out["rows"] = rows
    return out


if __name__ == "__main__":
    raise SystemExit(main_for(measure))

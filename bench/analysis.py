"""Benchmark 5: `summary` (and `diff`, once it exists) on a recording of 10 million spans.

The recording is synthetic but written by the real `RecordingWriter` in the batches a run
writes (65,536 rows at most, zstd): a learner and two workers with MADDPG's phase tree, span
durations drawn log-normal, one `iter` row per process iteration and 10 Hz core samples. The
commands run in a fresh process (`python -m marlwatch summary FILE --json`): the figures are
that process's wall time (interpreter start included) and its peak RSS (`ru_maxrss`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, main_for, row

TARGET_S = 2.0
TARGET_BYTES = 1 << 30

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
    from marlwatch.recording import ITER, SPAN, RecordingWriter, RunInfo

    rng = np.random.default_rng(seed)
    names = sorted({p[1] for p in PATTERN})
    name_idx = {n: i for i, n in enumerate(names)}
    names_arr = pa.array([*names, None], pa.string())
    slot = np.concatenate([np.full(p[3], p[0], np.int16) for p in PATTERN])
    name = np.concatenate([np.full(p[3], name_idx[p[1]]) for p in PATTERN])
    parent = np.concatenate([np.full(p[3], name_idx[p[2]] if p[2] else len(names)) for p in PATTERN])
    median_ns = np.concatenate([np.full(p[3], p[4], np.float64) for p in PATTERN])
    info = RunInfo(algo="maddpg", env="simple_spread", agents=3, workers=2, seed=0, iterations=None, cores=2,
                   procs={"0": "learner", "1": "worker 1", "2": "worker 2"}, pinning={"0": 0, "1": 1, "2": 0})
    iters_per_batch = max(1, 60_000 // SPANS_PER_ITER)
    iteration_ns = 100_000_000
    it = 0
    written = 0
    t0 = time.perf_counter()
    with RecordingWriter(path, info, overwrite=True) as w:  # path: our own temporary name
        while written < spans:
            k = iters_per_batch
            n = k * SPANS_PER_ITER
            iters = np.repeat(np.arange(it, it + k), SPANS_PER_ITER)
            dur = (np.tile(median_ns, k) * rng.lognormal(0.0, 0.5, n)).astype(np.int64)
            start = iters * iteration_ns + rng.integers(0, iteration_ns // 2, n)
            order = np.lexsort((start, np.tile(slot, k)))
            cols = dict(
                kind=_const(SPAN, n, pa.string()), proc=pa.array(np.tile(slot, k)[order]),
                name=names_arr.take(pa.array(np.tile(name, k)[order])),
                parent=names_arr.take(pa.array(np.tile(parent, k)[order])),
                t_ns=pa.array(start[order]), dur_ns=pa.array(dur[order]), iter=pa.array(iters[order]),
            )
            w.append(_batch(n, **cols))
            ticks = np.arange(it + 1, it + k + 1)
            for s in (0, 1, 2):
                w.append(_batch(k, kind=_const(ITER, k, pa.string()), proc=_const(s, k, pa.int16()),
                                t_ns=pa.array(ticks * iteration_ns), iter=pa.array(ticks)))
            for j in range(k):  # 10 Hz core samples: one per 100 ms iteration
                w.append(core_rows(int((it + j) * iteration_ns), [float(rng.uniform(50, 100)) for _ in range(2)]))
            w.flush()
            it += k
            written += n
        w.close(t_ns=it * iteration_ns)
    return {"spans": written, "iterations": it, "bytes": path.stat().st_size,
            "generate_s": time.perf_counter() - t0}


_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from marlwatch.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"code": code, "in_process_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "maxrss": ru.ru_maxrss * 1024}), file=sys.stderr)
"""


# What `marlwatch replay` does under its UI: open, seek to the middle, play to the end.
_REPLAY_CHILD = _CHILD.replace("""from marlwatch.cli import main
code = main(sys.argv[1:])
""", """from marlwatch.playback import Playback
from marlwatch.recording import open_recording
pb = Playback.from_recording(open_recording(sys.argv[1]))
pb.seek_s(pb.duration_s / 2)
pb.to_end()
code = 0 if pb.at_end and pb.snapshot().complete else 1
""")


def time_command(*argv: str, child: str = _CHILD) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", child, *argv], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    wall = time.perf_counter() - t0
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "{}"
    try:
        stats = json.loads(last)
    except ValueError:
        stats = {"code": p.returncode, "error": p.stderr[-500:]}
    return {"wall_s": wall, **stats, "stdout": p.stdout}


def measure(quick: bool = False, spans: int | None = None) -> dict:
    spans = spans or (2_000_000 if quick else 10_000_000)
    cache = Path(tempfile.gettempdir()) / f"marlwatch-bench-{spans}.arrow"
    gen = None
    if not cache.exists():
        gen = generate(cache.with_suffix(".tmp"), spans)
        os.replace(cache.with_suffix(".tmp"), cache)
    size = cache.stat().st_size
    out: dict = {"spans": spans, "file": str(cache), "file_bytes": size, "generated": gen}
    s = time_command("summary", str(cache), "--json")
    summary = json.loads(s.pop("stdout") or "{}")
    out["summary"] = s
    counted = sum(p["count"] for p in summary.get("phases", {}).values())
    ok = s.get("code") == 0 and counted >= spans
    scale = 10_000_000 / spans
    rows = [row(f"summary on {spans / 1e6:.0f}M spans: wall time", f"{s['wall_s']:.2f} s",
                f"< {TARGET_S:.0f} s" + ("" if scale == 1 else " (at 10M)"),
                ok and s["wall_s"] * scale < TARGET_S,
                f"fresh process incl. interpreter+imports; CPU time {s.get('cpu_s', float('nan')):.2f} s "
                f"(what an idle machine would take, about); "
                f"file {size / 2**20:.0f} MB; {counted:,} spans summarised"),
            row(f"summary on {spans / 1e6:.0f}M spans: peak RSS", f"{s.get('maxrss', 0) / 2**20:.0f} MB", "< 1 GB",
                s.get("maxrss", 1 << 40) < TARGET_BYTES)]
    r = time_command(str(cache), child=_REPLAY_CHILD)
    r.pop("stdout")
    out["replay"] = r
    rows.append(row(f"replay of {spans / 1e6:.0f}M spans to the middle, then the end: wall / peak RSS",
                    f"{r['wall_s']:.2f} s / {r.get('maxrss', 0) / 2**20:.0f} MB", "< 1 GB",
                    r.get("code") == 0 and r.get("maxrss", 1 << 40) < TARGET_BYTES,
                    "the playhead reads the file as it plays and keeps only the batches around it"))
    try:
        import marlwatch.diff  # noqa: F401

        d = time_command("diff", str(cache), str(cache))
        d.pop("stdout")
        out["diff"] = d
        rows.append(row(f"diff of two {spans / 1e6:.0f}M-span recordings: wall / peak RSS",
                        f"{d['wall_s']:.2f} s / {d.get('maxrss', 0) / 2**20:.0f} MB", "", None,
                        f"exit {d.get('code')}"))
    except ModuleNotFoundError:
        rows.append(row("diff", "not built yet", "", None, "marlwatch.diff does not exist"))
    out["rows"] = rows
    return out


if __name__ == "__main__":
    raise SystemExit(main_for(measure))

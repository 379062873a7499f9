"""The Ray backend (docs/distributed.md): MADDPG's IPS on `--backend ray` against `--backend local`
with the same workers, runs interleaved (local, ray, ray, local, ...) and compared as a ratio; and
the telemetry throughput over the monitor's listener with 32 producers (bench/pipeline.py,
`measure_socket`): spans/s with no loss.

Both backends run the same learner and rollout code; the difference is the transport (pipes and
pickles vs Ray's object store and actor calls) and that Ray's actors are not pinned. IPS leaves the
start-up out (a process's first iteration, docs/metrics.md), so Ray's own start-up (tens of seconds
on a loaded machine) does not count; it is reported apart, as the run's wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, main_for, median, row, spread

RUN = ["run", "--headless", "--algo", "maddpg", "--agents", "3", "--workers", "2",
       "--set", "warmup=256", "--set", "batch_size=64"]


def one_run(backend: str, iterations: int, path: Path) -> dict:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a local Ray on the loopback address
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "marlwatch", *RUN, "--backend", backend, "--iterations",
                        str(iterations), "--record", str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1800)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{backend} run failed: {r.stderr.strip().splitlines()[-1:]}")
    s = json.loads(subprocess.run([sys.executable, "-m", "marlwatch", "summary", "--json", str(path)], cwd=REPO,
                                  capture_output=True, text=True, check=True).stdout)
    return {"backend": backend, "ips": s["ips"], "iterations": s["iterations"], "wall_s": wall}


def measure(quick: bool = False) -> dict:
    import pipeline

    pairs, iterations = (1, 60) if quick else (2, 150)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mw-ray-") as tmp:
        for k in range(pairs):
            order = ("local", "ray") if k % 2 == 0 else ("ray", "local")
            for backend in order:
                runs.append(one_run(backend, iterations, Path(tmp) / f"{backend}-{k}.arrow"))
    ips = {b: [r["ips"] for r in runs if r["backend"] == b] for b in ("local", "ray")}
    walls = {b: [r["wall_s"] for r in runs if r["backend"] == b] for b in ("local", "ray")}
    ratios = [r / loc for r, loc in zip(ips["ray"], ips["local"], strict=True)]
    lo, hi = spread(ratios)
    out: dict = {"runs": runs, "ratio_median": median(ratios)}
    rows = [row("MADDPG IPS, --backend ray / local (3 agents, 2 workers, interleaved)", f"{median(ratios):.2f}x",
                "", None, f"ray {median(ips['ray']):.1f} IPS, local {median(ips['local']):.1f} IPS; pairs {lo:.2f}-"
                          f"{hi:.2f}x; {iterations} iterations; run wall time ray {median(walls['ray']):.0f} s, "
                          f"local {median(walls['local']):.0f} s (Ray's start-up)")]
    sock = pipeline.measure_socket(quick)
    out["socket"] = {k: v for k, v in sock.items() if k != "rows"}
    out["rows"] = rows + sock["rows"]
    return out


if __name__ == "__main__":
    raise SystemExit(main_for(measure))

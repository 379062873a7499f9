"""The table of `marlwatch sweep` (marlwatch/cli/sweep.py): how the time of an agents x workers grid scales.

Each cell is a real headless run with its own recording, all under one folder, so `summary`,
`diff` and `replay` work on any cell. The table is computed from the recordings through
`marlwatch.metrics.summarize` (one home for every figure) and saved as CSV, JSON and markdown.

Growth per doubling of agents: for cells with the same worker count, sorted by agents, the
growth of a time t from a1 to a2 agents is (t2 / t1) ** (1 / log2(a2 / a1)), i.e. the factor
per doubling even when the grid skips a step; the fit over all agent counts (least squares of
log2 t on log2 agents) gives one factor per worker count.

With `--latency-bound MS`, the latency-bounded choice (`metrics.latency_bounded_choice`, defined
in docs/metrics.md) names per agent count the worker count with the highest IPS whose p99
iteration latency is within the bound. The plots and report.html: marlwatch/sweep_report.py.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from marlwatch.metrics import BoundCandidate, BoundChoice, latency_bounded_choice
from marlwatch.outputs import atomic_output, numbered, write_text
from marlwatch.recording import RecordingError, open_recording
from marlwatch.report import percent, plural
from marlwatch.terminal import finite


# -- the table -----------------------------------------------------------------------------------
@dataclass
class Row:
    algo: str
    agents: int
    workers: int
    iterations: int
    ips: float
    sample_share: float
    update_share: float
    sync_share: float
    comm_share_exec: float
    comm_share_update: float
    update_ms_per_iter: float
    comm_ms_per_iter: float
    update_growth_per_doubling: float | None
    comm_growth_per_doubling: float | None
    p99_ms: float  # the main loop's p99 iteration latency (after the first)
    cores_util: float | None  # mean utilisation of all cores during the cell (%): how loaded the machine was
    recording: str
    # Every phase's time per learner iteration (all processes), for the per-phase growth; in the
    # JSON only, not in the flat CSV and markdown tables.
    phase_ms: dict[str, float] = field(default_factory=dict)


COLUMNS = [f for f in Row.__dataclass_fields__ if f != "phase_ms"]


def _growth(t1: float, t2: float, a1: int, a2: int) -> float | None:
    if t1 <= 0 or t2 <= 0 or a2 <= a1:
        return None
    return (t2 / t1) ** (1.0 / math.log2(a2 / a1))


def fitted_growth(agents: list[int], times: list[float]) -> float | None:
    """Factor per doubling from a least-squares line of log2(time) on log2(agents)."""
    pts = [(math.log2(a), math.log2(t)) for a, t in zip(agents, times, strict=True) if t > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return 2.0**slope


def table(recordings: list[Path]) -> list[Row]:
    """One row per recording, growth factors filled in per worker count; raises RecordingError
    for a file that is not a recording of a run."""
    from marlwatch.metrics import summarize

    rows = []
    for path in recordings:
        snap = summarize(open_recording(path))
        info = snap.info
        if info is None:
            raise RecordingError(f"{path}: no run information in the recording")
        it = max(snap.steady_iterations, 1)  # the figures leave the first (start-up) iteration out
        rows.append(Row(
            algo=info.algo, agents=info.agents, workers=info.workers, iterations=snap.iterations, ips=snap.ips,
            sample_share=snap.shares["sample"], update_share=snap.shares["update"], sync_share=snap.shares["sync"],
            comm_share_exec=snap.comm_share, comm_share_update=snap.comm_share_update,
            update_ms_per_iter=snap.update_s * 1e3 / it, comm_ms_per_iter=snap.comm_s * 1e3 / it,
            update_growth_per_doubling=None, comm_growth_per_doubling=None,
            p99_ms=snap.iteration_ms["p99"], recording=path.name,
            cores_util=sum(snap.cores_mean) / len(snap.cores_mean) if snap.cores_mean else None,
            phase_ms={p.name: p.total_s * 1e3 / it for p in snap.phases},
        ))
    rows.sort(key=lambda r: (r.algo, r.workers, r.agents))
    for prev, cur in zip(rows, rows[1:], strict=False):
        if (prev.algo, prev.workers) == (cur.algo, cur.workers):
            cur.update_growth_per_doubling = _growth(prev.update_ms_per_iter, cur.update_ms_per_iter,
                                                     prev.agents, cur.agents)
            cur.comm_growth_per_doubling = _growth(prev.comm_ms_per_iter, cur.comm_ms_per_iter,
                                                   prev.agents, cur.agents)
    return rows


def fits(rows: list[Row]) -> dict[int, dict[str, float | None]]:
    """Per worker count: growth per doubling fitted over every agent count."""
    out: dict[int, dict[str, float | None]] = {}
    for w in sorted({r.workers for r in rows}):
        sel = [r for r in rows if r.workers == w]
        agents = [r.agents for r in sel]
        out[w] = {"update": fitted_growth(agents, [r.update_ms_per_iter for r in sel]),
                  "comm": fitted_growth(agents, [r.comm_ms_per_iter for r in sel])}
    return out


def _x(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def bound_choices(rows: list[Row], bound_ms: float) -> list[BoundChoice]:
    """The latency-bounded choice over the sweep's worker counts, per algorithm and agent count."""
    return latency_bounded_choice((BoundCandidate(r.algo, r.agents, (("workers", r.workers),), r.ips, r.p99_ms)
                                   for r in rows), bound_ms)


def bound_lines(choices: list[BoundChoice]) -> list[str]:
    """One sentence per agent count: the best setting, its IPS and p99, and how far the others are."""
    lines = []
    for ch in choices:
        head = f"{ch.algo}, {plural(ch.agents, 'agent')}, p99 within {ch.bound_ms:g} ms: "
        if ch.best is None:
            lines.append(head + "no setting (" + "; ".join(
                f"{c.label()}: p99 {c.p99_ms:.0f} ms" for c, _, _ in ch.rows) + ")")
            continue
        others = []
        for c, ok, ratio in ch.rows:
            if c is ch.best:
                continue
            if not ok:
                others.append(f"{c.label()} over the bound (p99 {c.p99_ms:.0f} ms)")
            else:
                others.append(f"{c.label()} {c.ips:.2f} IPS ({_x(ratio)} slower)" if ratio and ratio > 1
                              else f"{c.label()} {c.ips:.2f} IPS")
        lines.append(head + f"{ch.best.label()}, {ch.best.ips:.2f} IPS (p99 {ch.best.p99_ms:.0f} ms)"
                     + (f"; {'; '.join(others)}" if others else ""))
    return lines


def markdown(algo: str, rows: list[Row], bound_ms: float | None = None) -> str:
    head = ("| agents | workers | iters | IPS | p99 ms | sample | update | sync | comm / exec | comm / update "
            "| update ms/it | comm ms/it | update x per 2x agents | comm x per 2x agents |")
    lines = [head, "|" + "---:|" * 14]
    for r in rows:
        lines.append(
            f"| {r.agents} | {r.workers} | {r.iterations} | {r.ips:.2f} | {r.p99_ms:.0f} | {percent(r.sample_share)} "
            f"| {percent(r.update_share)} | {percent(r.sync_share)} | {percent(r.comm_share_exec)} "
            f"| {percent(r.comm_share_update)} | {r.update_ms_per_iter:.1f} | {r.comm_ms_per_iter:.1f} "
            f"| {_x(r.update_growth_per_doubling)} | {_x(r.comm_growth_per_doubling)} |"
        )
    lines.append("")
    for w, f in fits(rows).items():
        lines.append(f"Fitted over all agent counts, {w} worker(s): update time {_x(f['update']) or 'n/a'} "
                     f"and communication time {_x(f['comm']) or 'n/a'} per doubling of agents ({algo}).")
    if bound_ms is not None:
        lines.append("")
        lines.append(f"Latency-bounded throughput (highest IPS with p99 iteration latency <= {bound_ms:g} ms):")
        lines += [f"- {line}" for line in bound_lines(bound_choices(rows, bound_ms))]
    return "\n".join(lines) + "\n"


def save(out: Path, algo: str, rows: list[Row], bound_ms: float | None = None) -> dict[str, Path]:
    paths = {"csv": out / "sweep.csv", "json": out / "sweep.json", "md": out / "sweep.md"}
    with atomic_output(paths["csv"], newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    doc = {"algo": algo, "rows": [asdict(r) for r in rows],
           "fitted_growth_per_doubling": {str(k): v for k, v in fits(rows).items()}}
    if bound_ms is not None:
        doc["latency_bound"] = [c.to_json() for c in bound_choices(rows, bound_ms)]
    write_text(paths["json"], json.dumps(finite(doc), indent=2, allow_nan=False) + "\n")
    write_text(paths["md"], markdown(algo, rows, bound_ms))
    return paths


def new_folder(base: Path) -> Path:
    """The first of `base`, `base-2`, ... that this call creates (two sweeps started in the same
    second get a folder each)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for candidate in numbered(base):
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")  # numbered() never ends


def recordings_in(folder: Path) -> list[Path]:
    """The recordings a sweep left in `folder` (every *.arrow directly in it), sorted by name."""
    return sorted(p for p in folder.glob("*.arrow") if p.is_file())

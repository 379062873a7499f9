"""The sweep report: how time scales with agents and workers, as plots people look at.

`marlwatch sweep ... --report` (and `marlwatch report SWEEP_DIR`, from the recordings a sweep left)
writes `report.html`: one self-contained file (matplotlib figures inlined as SVG, no script, no
file beside it) with

1. update and communication time per iteration vs agents, log-log, with the growth per doubling
   fitted over the agent counts (`sweep.fitted_growth`);
2. every update phase's time per iteration vs agents, log-log, with its own fitted growth: which
   term grows fastest, and where it takes over;
3. communication share of execution and of update time vs agents;
4. IPS vs workers per agent count, the latency-bounded choice marked (`--latency-bound`);
5. the table against the published figures (Wiggins et al. 2023, arXiv 2309.07108), and the
   sweep's own table.

The same series feed small plotext plots printed in the terminal at the end of a sweep. Every
figure comes from the sweep's rows (`sweep.table`, through `metrics.summarize`); this module only
draws them. matplotlib is an optional extra (`pip install 'marlwatch[report]'`).
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marlwatch.metrics import BoundChoice, is_comm
from marlwatch.outputs import write_text
from marlwatch.report import percent
from marlwatch.sweep import Row, bound_choices, bound_lines, fits, fitted_growth

REPORT_NAME = "report.html"
MIN_PHASE_SHARE = 0.01  # phase plots show phases of at least 1% of update time at the most agents


class ReportError(ValueError):
    """A report that cannot be made (no plotting library, no recordings): one line for the user."""


def check_plotting() -> None:
    """Raise ReportError when matplotlib (the `report` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError("the HTML report needs matplotlib: pip install 'marlwatch[report]'") from None


# -- the published figures ----------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    algo: str
    figure: str
    value: str
    ours: Callable[[list[Row]], str]


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _range(values: list[float], fmt: Callable[[float], str]) -> str:
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}-{fmt(hi)}"


def _share(attr: str) -> Callable[[list[Row]], str]:
    def ours(rows: list[Row]) -> str:
        per_cell = "; ".join(f"{r.agents}a/{r.workers}w {percent(getattr(r, attr))}" for r in rows)
        return f"{_range([getattr(r, attr) for r in rows], percent)} ({per_cell})"
    return ours


def _update_growth(rows: list[Row]) -> str:
    parts = []
    for w, f in fits(rows).items():
        steps = ", ".join(f"{_x(r.update_growth_per_doubling)} to {r.agents}" for r in rows
                          if r.workers == w and r.update_growth_per_doubling is not None)
        parts.append(f"{w} worker(s): fitted {_x(f['update'])} ({steps})")
    return "; ".join(parts) or "n/a"


PUBLISHED = [
    Published("tom2c", "communication share of execution time", "25.8%", _share("comm_share_exec")),
    Published("tom2c", "communication share of update time", "47.0%", _share("comm_share_update")),
    Published("tom2c", "update time per doubling of agents", "about 8x", _update_growth),
    Published("neurcomm", "communication share of execution time", "72.2%", _share("comm_share_exec")),
]


def published_table(rows: list[Row]) -> list[tuple[str, str, str, str]]:
    """(algorithm, figure, published, this sweep) for the sweep's algorithms."""
    algos = sorted({r.algo for r in rows})
    return [(p.algo, p.figure, p.value, p.ours([r for r in rows if r.algo == p.algo]))
            for p in PUBLISHED if p.algo in algos]


# -- the series every plot draws (the HTML and the terminal plots share them) --------------------
@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    dashed: bool = False


def _by_workers(rows: list[Row]) -> dict[int, list[Row]]:
    out: dict[int, list[Row]] = {}
    for r in sorted(rows, key=lambda r: (r.workers, r.agents)):
        out.setdefault(r.workers, []).append(r)
    return out


def time_series(rows: list[Row]) -> list[Series]:
    """Update and communication ms per iteration vs agents, per worker count, with fitted growth."""
    out = []
    for w, sel in _by_workers(rows).items():
        a = [r.agents for r in sel]
        for what, attr, dashed in (("update", "update_ms_per_iter", False), ("comm", "comm_ms_per_iter", True)):
            y = [getattr(r, attr) for r in sel]
            out.append(Series(f"{what}, {w}w ({_x(fitted_growth(a, y))}/2x)", a, y, dashed))
    return out


def phase_series(rows: list[Row], workers: int | None = None, top: str = "update") -> list[Series]:
    """Each innermost phase under `top` (`update/backward`, `update/comm/graph`; not a phase that has
    phases under it): ms per iteration vs agents (the fewest workers by default), with its fitted
    growth per doubling, fastest-growing first."""
    groups = _by_workers(rows)
    if not groups:
        return []
    sel = groups[workers if workers in groups else min(groups)]
    under = {n for r in sel for n in r.phase_ms if n.startswith(top + "/")}
    names = sorted(n for n in under if not any(m.startswith(n + "/") for m in under))
    # Phases too small to matter at the most agents are left out (they only clutter the plot).
    update_at_most = max(sel, key=lambda r: r.agents).update_ms_per_iter
    out = []
    for name in names:
        pts = [(r.agents, r.phase_ms.get(name, 0.0)) for r in sel if r.phase_ms.get(name, 0.0) > 0]
        if len(pts) < 2:
            continue
        a, y = [p[0] for p in pts], [p[1] for p in pts]
        growth = fitted_growth(a, y)
        out.append((growth or 0.0, Series(f"{name.split('/', 1)[1]} ({_x(growth)}/2x)", a, y, is_comm(name))))
    out.sort(key=lambda gs: -gs[0])
    return [s for _, s in out if s.y[-1] >= MIN_PHASE_SHARE * update_at_most]


def share_series(rows: list[Row]) -> list[Series]:
    out = []
    for w, sel in _by_workers(rows).items():
        a = [r.agents for r in sel]
        out.append(Series(f"comm / exec, {w}w", a, [100 * r.comm_share_exec for r in sel]))
        out.append(Series(f"comm / update, {w}w", a, [100 * r.comm_share_update for r in sel], True))
    return out


def ips_series(rows: list[Row]) -> list[Series]:
    by_agents: dict[int, list[Row]] = {}
    for r in sorted(rows, key=lambda r: (r.agents, r.workers)):
        by_agents.setdefault(r.agents, []).append(r)
    return [Series(f"{a} agents", [r.workers for r in sel], [r.ips for r in sel]) for a, sel in by_agents.items()]


# -- HTML with matplotlib ---------------------------------------------------------------------------
def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "marlwatch", "font.size": 9})
    return plt.subplots(figsize=(8.6, 3.8))


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: no XML declaration or doctype


def _lines(ax: Any, series: list[Series], loglog: bool) -> None:
    from matplotlib.ticker import LogFormatter, NullLocator

    for s in series:
        ax.plot(s.x, s.y, marker="o", linestyle="--" if s.dashed else "-", label=s.label)
    if loglog:
        ax.set_yscale("log")
        # 400, not 4x10^2; LogFormatter thins the minor labels when the range is wide.
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ax.set_xscale("log", base=2)  # agent and worker counts double
    xs = sorted({x for s in series for x in s.x})
    if xs:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())  # the measured counts are the only x ticks
    ax.grid(True, which="major", alpha=0.3)
    if series:  # beside the plot, never over the lines
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot_times(rows: list[Row]) -> str:
    fig, ax = _figure()
    _lines(ax, time_series(rows), loglog=True)
    ax.set(xlabel="agents", ylabel="ms per learner iteration",
           title="Update (solid) and communication (dashed) time vs agents, log-log")
    return _svg(fig)


def plot_phases(rows: list[Row]) -> str:
    fig, ax = _figure()
    _lines(ax, phase_series(rows), loglog=True)
    w = min(_by_workers(rows), default=1)
    ax.set(xlabel="agents", ylabel="ms per learner iteration",
           title=f"Update phases vs agents, {w} worker(s) (log-log; dashed: communication)")
    return _svg(fig)


def plot_shares(rows: list[Row]) -> str:
    fig, ax = _figure()
    _lines(ax, share_series(rows), loglog=False)
    ax.set(xlabel="agents", ylabel="% of time", ylim=(0, 100),
           title="Communication share of execution (solid) and of update (dashed)")
    return _svg(fig)


def plot_ips(rows: list[Row], choices: list[BoundChoice], bound_ms: float | None) -> str:
    fig, ax = _figure()
    _lines(ax, ips_series(rows), loglog=False)
    for ch in choices:
        over = [(dict(c.setting)["workers"], c.ips) for c, ok, _ in ch.rows if not ok]
        if over:  # settings whose p99 is over the bound: crossed out
            ax.plot(*zip(*over, strict=True), marker="x", markersize=10, color="grey", linestyle="none", zorder=4)
        if ch.best is not None:
            ax.plot([dict(ch.best.setting)["workers"]], [ch.best.ips], marker="*", markersize=16,
                    color="black", linestyle="none", zorder=5)
            ax.annotate(f"LBT {ch.agents}a", (dict(ch.best.setting)["workers"], ch.best.ips),
                        textcoords="offset points", xytext=(6, 6), fontsize=7)
    bound = f" (star: highest IPS with p99 <= {bound_ms:g} ms; x: p99 over it)" if bound_ms is not None else ""
    ax.set(xlabel="rollout workers", ylabel="iterations per second", title=f"IPS vs workers{bound}")
    return _svg(fig)


def _table(head: list[str], body: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>"


def _cell_table(rows: list[Row]) -> str:
    head = ["agents", "workers", "iters", "IPS", "p99 ms", "sample", "update", "sync", "comm / exec",
            "comm / update", "update ms/it", "comm ms/it", "update x/2x", "comm x/2x", "recording"]
    body = [[str(r.agents), str(r.workers), str(r.iterations), f"{r.ips:.2f}", f"{r.p99_ms:.0f}",
             percent(r.sample_share), percent(r.update_share), percent(r.sync_share), percent(r.comm_share_exec),
             percent(r.comm_share_update), f"{r.update_ms_per_iter:.1f}", f"{r.comm_ms_per_iter:.1f}",
             "" if r.update_growth_per_doubling is None else _x(r.update_growth_per_doubling),
             "" if r.comm_growth_per_doubling is None else _x(r.comm_growth_per_doubling), r.recording]
            for r in rows]
    return _table(head, body)


STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}figure{margin:1.5em 0}svg{max-width:100%;height:auto}
.note{color:#555;font-size:13px}"""


def html_report(rows: list[Row], bound_ms: float | None, title: str, notes: list[str] = ()) -> str:
    """The whole report as one HTML document (figures inlined as SVG)."""
    check_plotting()
    choices = bound_choices(rows, bound_ms) if bound_ms is not None else []
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append("<h2>Against the published figures</h2>")
    pub = published_table(rows)
    parts.append(_table(["algorithm", "figure", "Wiggins et al. 2023", "this sweep"], [list(p) for p in pub])
                 if pub else "<p>No published figure for this algorithm.</p>")
    parts.append("<h2 id='time'>Time vs agents</h2><figure id='plot-time'>" + plot_times(rows) + "</figure>")
    parts.append("<h2 id='phases'>Which update phase grows</h2><figure id='plot-phases'>"
                 + plot_phases(rows) + "</figure>")
    parts.append("<h2 id='shares'>Communication shares</h2><figure id='plot-shares'>" + plot_shares(rows)
                 + "</figure>")
    parts.append("<h2 id='ips'>Throughput vs workers</h2><figure id='plot-ips'>" + plot_ips(rows, choices, bound_ms)
                 + "</figure>")
    if bound_ms is not None:
        parts.append("<h3>Latency-bounded throughput</h3><ul>"
                     + "".join(f"<li>{html.escape(line)}</li>" for line in bound_lines(choices)) + "</ul>")
    parts.append("<h2>Every cell</h2>" + _cell_table(rows))
    parts.append("<p class='note'>Shares are of all processes' top-level span time after each one's first "
                 "iteration; ms/it per learner iteration; growth per doubling as (t2/t1)^(1/log2(a2/a1)); "
                 "definitions in docs/metrics.md.</p></body></html>")
    return "\n".join(parts) + "\n"


def notes(rows: list[Row], folder: Path) -> list[str]:
    """What the reader needs to weigh the figures: algorithm, host, settings, how loaded the cores were."""
    from marlwatch.recording import open_recording

    if not rows:
        return []
    info = open_recording(folder / rows[0].recording).info
    notes = [f"{info.algo} on {info.env}, host {info.host or '?'} ({info.cores} cores)"] if info else []
    settings = info.extra.get("settings") if info else None
    if isinstance(settings, dict) and settings:
        notes.append("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    util = [r.cores_util for r in rows if r.cores_util is not None]
    if util:
        notes.append(f"mean core utilisation during the cells: {min(util):.0f}-{max(util):.0f}% (all cores; "
                     "near 100% means other work shared the machine: compare ratios within the sweep)")
    return notes


def write_report(folder: Path, rows: list[Row], bound_ms: float | None) -> Path:
    path = folder / REPORT_NAME
    algos = ", ".join(sorted({r.algo for r in rows}))
    write_text(path, html_report(rows, bound_ms, f"marlwatch sweep: {algos}", notes(rows, folder)))
    return path


# -- terminal plots -----------------------------------------------------------------------------------
def _plotext(series: list[Series], title: str, loglog: bool, color: bool, width: int, height: int) -> str:
    import plotext as plt

    plt.clf()
    plt.plotsize(width, height)
    plt.theme("pro" if color else "clear")
    if loglog:
        plt.xscale("log")
        plt.yscale("log")
    for s in series:
        plt.plot(s.x, s.y, label=s.label, marker="dot" if s.dashed else "braille")
    xs = sorted({x for s in series for x in s.x})
    if xs:
        plt.xticks(xs, [f"{x:g}" for x in xs])
    plt.title(title)
    text = plt.build()
    return text if color else plt.uncolorize(text)


def terminal_plots(rows: list[Row], bound_ms: float | None, color: bool = False, width: int = 72,
                   height: int = 14) -> str:
    """Small plots of the report's series, as text (no escape sequences unless `color`)."""
    if not rows:
        return ""
    out = [_plotext(time_series(rows), "update (dots: comm) ms/it vs agents, log-log", True, color, width, height)]
    phases = phase_series(rows)
    if phases:
        out.append(_plotext(phases[:5], "update phases ms/it vs agents, log-log", True, color, width, height))
    if len({r.workers for r in rows}) > 1:
        out.append(_plotext(ips_series(rows), "IPS vs workers", False, color, width, height))
    if bound_ms is not None:
        out.append("\n".join(bound_lines(bound_choices(rows, bound_ms))))
    return "\n".join(out) + "\n"


# -- command ------------------------------------------------------------------------------------------
def recorded_bound(folder: Path, rows: list[Row]) -> float | None:
    """The latency bound the sweep's recordings carry (`sweep --latency-bound`), if they agree on one."""
    from marlwatch.recording import open_recording

    bounds = set()
    for r in rows:
        info = open_recording(folder / r.recording).info
        b = info.extra.get("latency_bound_ms") if info else None
        bounds.add(float(b) if isinstance(b, int | float) and math.isfinite(b) else None)
    return bounds.pop() if len(bounds) == 1 else None


"""Plain-text renderings of a Snapshot: the progress line and the summary table."""

from __future__ import annotations

import math
import textwrap
from typing import Any

from marlwatch.metrics import Snapshot, Warmup
from marlwatch.terminal import printable


def plural(n: int | None, noun: str) -> str:
    """`1 worker`, `2 workers` (and `None workers` never: an unknown count is `? workers`)."""
    return f"{'?' if n is None else n} {noun}{'' if n == 1 else 's'}"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def percent(share: float, width: int = 0, *, decimals: int = 1, keep_small: bool = False) -> str:
    """A share (0..1) as a percentage: `percent(0.1234)` is `12.3%`. `width` right-aligns the
    number (table columns); `keep_small`: a share too small for `decimals` keeps two significant
    digits (0.031%, not 0.0%), where saying how small matters."""
    if keep_small and 0 < share < 10 ** -(decimals + 1):
        return f"{100 * share:{width}.2g}%"
    return f"{100 * share:{width}.{decimals}f}%"


def ms(x: float) -> str:
    return "-" if math.isnan(x) else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def warming_up(w: Warmup) -> str:
    """`warming up 12,800/25,600 transitions`."""
    return f"warming up {w.done:,.0f}/{w.needed:,.0f} {printable(w.unit)}"


def warmup_line(w: Warmup) -> str:
    """The summary's line about a reported warm-up, over or not."""
    if w.active:
        return f"{warming_up(w)} when the recording ends: no model update yet"
    when = f", over at {w.ended_s:.1f} s" if w.ended_s is not None else ""
    return f"warm-up: {w.needed:,.0f} {printable(w.unit)} before the first update{when}"


def progress_line(s: Snapshot, total: int | None, rec_bytes: int) -> str:
    of = f"/{total}" if total else ""
    rec = f"rec {human_bytes(rec_bytes)}"
    if s.startup_s is None:  # no iteration has ended: every rate and share would be a zero
        return f"it {s.iterations}{of}  starting up {s.t_s:.0f} s  {rec}"
    comm = (warming_up(s.warmup) if s.warmup is not None and s.warmup.active else
            f"comm {percent(s.comm_share)} of exec, {percent(s.comm_share_update)} of update")
    return (
        f"it {s.iterations}{of}  IPS {s.ips_now:6.2f} (mean {s.ips:.2f})  {comm}  "
        f"sample {percent(s.shares['sample'])} update {percent(s.shares['update'])} "
        f"sync {percent(s.shares['sync'])}  {rec}"
    )


WIDTH = 80  # the summary fits a terminal of this width


def startup_line(s: Snapshot) -> str:
    """`start-up 7.66 s (run start to the end of the first iteration)`, or that it is not over."""
    if s.startup_s is None:
        return "start-up: the first iteration has not ended"
    return f"start-up {s.startup_s:.2f} s (run start to the end of the first iteration)"


def node_line(n: dict[str, Any]) -> str:
    """``node-b host-2 (2 cores)``: a node of a run across machines (marlwatch.nodes)."""
    cores = "cores not reported" if n.get("cores") is None else plural(n["cores"], "core")
    return f"{n['node']} {n.get('host') or n.get('ip') or '?'} ({cores}{', the monitor' if n.get('local') else ''})"


def summary_text(s: Snapshot, path: str = "", status: str = "") -> str:
    info = s.info
    lines = []
    if info:
        lines.append(f"{path}  [{status}]" if path else f"[{status}]")
        if info.launcher == "builtin":
            what = (f"{info.algo} on {info.env}, {plural(info.agents, 'agent')}, {plural(info.workers, 'worker')}, "
                    f"seed {info.seed}")
        else:
            what = printable(info.title())
            if isinstance(info.extra.get("git_commit"), str):
                what += f" (git {printable(info.extra['git_commit'][:12])})"
        lines.append(f"{what}, spans {'on' if info.spans else 'off'}")
    lines.append(f"iterations {s.iterations}  {startup_line(s)}")
    lines.append(f"IPS {s.ips:.2f} ({plural(s.steady_iterations, 'iteration')} after the first, in "
                 f"{s.steady_s:.2f} s)  "
                 f"wall {s.wall_s:.2f} s")
    lines.append(f"iteration latency p50/p95/p99 {ms(s.iteration_ms['p50'])}/{ms(s.iteration_ms['p95'])}/"
                 f"{ms(s.iteration_ms['p99'])} ms (after the first)")
    if s.latency_bound_ms is not None and s.bounded_ips is not None:
        met = "-" if s.bound_met is None or math.isnan(s.bound_met) else percent(s.bound_met)
        lines.append(f"latency-bounded IPS {s.bounded_ips:.2f} (bound {s.latency_bound_ms:g} ms: {met} of "
                     f"iterations, p99 {'within' if s.p99_within_bound else 'over'})")
    lines.append(f"communication: {percent(s.comm_share)} of execution time (sample+update), "
                 f"{percent(s.comm_share_update)} of update time")
    if s.warmup is not None:
        lines.append(warmup_line(s.warmup))
    lines.append("process time: " + "  ".join(f"{k} {percent(v)}" for k, v in s.shares.items()
                                              if v or k != "other"))
    lines.append("")
    labels = [p.name + (" *" if p.comm else "") for p in s.phases]
    numbers = f"{'total s':>8}{'share':>7}{'count':>8}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}"
    # The name column takes what the numbers leave; a longer name pushes its own row wider.
    w = min(max([len("phase"), *map(len, labels)]), WIDTH - len(numbers))
    header = f"{'phase':<{w}}{numbers}"
    lines += [header, "-" * len(header)]
    for p, label in zip(s.phases, labels, strict=True):
        lines.append(f"{label:<{w}}{p.total_s:8.3f}{percent(p.share, 6)}{p.count:8d}{ms(p.p50_ms):>8}"
                     f"{ms(p.p95_ms):>8}{ms(p.p99_ms):>8}")
    lines.append("(* communication)")
    if s.cores_mean or s.nodes:
        lines.append("")
    if s.nodes:
        lines += textwrap.wrap("nodes: " + "  ".join(node_line(n) for n in s.nodes), WIDTH, subsequent_indent="  ",
                               break_long_words=False)
    if s.cores_mean:
        host = f"host {info.host}, " if info and info.host and not s.nodes else ""
        lines += textwrap.wrap(f"cores ({host}mean util): " + "  ".join(f"{s.core_label(i)} {u:.0f}%" for i, u in
                                                                 enumerate(s.cores_mean)),
                               WIDTH, subsequent_indent="  ", break_long_words=False)
    if s.procs:
        lines.append("processes:")
        role_w = max(len(p.role) for p in s.procs)
        lines += [f"  {p.role:<{role_w}}  {p.state:<9} {p.iterations:>7} it  {p.ips:7.2f} IPS" for p in s.procs]
    if "episode_return" in s.counters:
        recent = s.returns[-20:]
        lines.append(f"episode return: last {s.counters['episode_return']:.2f}, mean of last {len(recent)} "
                     f"{sum(recent) / max(1, len(recent)):.2f}")
    # Names, roles, states and the path come from the recording: each line is made printable
    # (a name holding a line break stays on its line).
    return "\n".join(printable(line) for line in lines)

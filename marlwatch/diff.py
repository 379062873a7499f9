"""`marlwatch diff A.arrow B.arrow`: what changed between two runs, with confidence intervals.

Every figure is resampled over iterations (the per-iteration table from
`marlwatch.metrics.read_iterations`), so run-to-run noise shows up as a wide interval instead
of a false verdict. The figures themselves are metrics.py's: over the iterations after the first
(start-up), the very numbers `summary` gives for each recording. The bootstrap is a circular block bootstrap (blocks of about n^(1/3)
consecutive iterations), because neighbouring iterations are correlated (warm-up, replay buffer
filling, a neighbour process hogging a core for a second): resampling single iterations would
make the intervals too narrow. A verdict ("slower", "faster", "higher", "lower") is given only
where the 95% interval excludes zero AND the change is at least `--min-change` percent of the
baseline value (default 10%, as asv's default factor of 1.1): the bootstrap sees only the noise
within each run, while two runs of one config also differ as a whole by a few percent (core,
memory layout, what else the machine did), so smaller changes are "within noise".

`--fail-if-slower PCT` (marlwatch/cli/files.py) fails when B's IPS is slower than A's by more
than PCT percent with confidence: the upper end of the interval of the IPS change is below -PCT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from marlwatch.metrics import IterationTable, Snapshot, read_iterations
from marlwatch.recording import Recording, RecordingError
from marlwatch.report import plural
from marlwatch.terminal import printable
from marlwatch.validate import MAX_BOOTSTRAP_DRAWS, BoundExceeded

RESAMPLES = 2000
CONFIDENCE = 0.95
MIN_CHANGE_PCT = 10.0


@dataclass
class Row:
    """One compared figure. `change` is percent for times and IPS, percentage points for shares."""

    figure: str
    a: float
    b: float
    unit: str  # "ms/it", "IPS", "%"
    change: float
    lo: float
    hi: float
    change_unit: str  # "%" or "pp"
    verdict: str  # slower / faster / higher / lower / new / gone / within noise


@dataclass
class Diff:
    a_path: str
    b_path: str
    header: dict[str, Any]
    notes: list[str]  # configuration differences the reader must know about
    rows: list[Row]

    def row(self, figure: str) -> Row:
        return next(r for r in self.rows if r.figure == figure)

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a_path, "b": self.b_path, **self.header, "notes": self.notes,
                "confidence": CONFIDENCE, "rows": [asdict(r) for r in self.rows]}


class BlockBootstrap:
    """Circular block bootstrap over n iterations, drawn once and applied to any series.

    A replicate of a series' total is the sum of its window sums at the drawn block starts;
    with prefix sums each window costs two look-ups, so memory is resamples x blocks
    (about resamples x n^(2/3)), never resamples x n; it is bounded (MAX_BOOTSTRAP_DRAWS).
    """

    CHUNK = 1 << 20  # block starts looked up at once: bounds the temporaries of sums()

    def __init__(self, n: int, resamples: int, rng: np.random.Generator) -> None:
        self.n = n
        self.block = max(1, round(n ** (1 / 3)))
        blocks = self.blocks(n)
        if resamples * blocks > MAX_BOOTSTRAP_DRAWS:
            raise BoundExceeded(f"--resamples {resamples:,} over {n:,} iterations draws {resamples * blocks:,} "
                                f"blocks, more than the bound of {MAX_BOOTSTRAP_DRAWS:,}; use --resamples "
                                f"{max(1, MAX_BOOTSTRAP_DRAWS // max(1, blocks)):,} or fewer")
        self.starts = rng.integers(0, max(n, 1), size=(resamples, blocks), dtype=np.int32 if n < 2**31 else np.int64)
        # Every block is `block` long but the last, which makes the replicate n iterations in all.
        self.lengths = np.full(blocks, self.block)
        if blocks:
            self.lengths[-1] = n - (blocks - 1) * self.block

    @staticmethod
    def blocks(n: int) -> int:
        return math.ceil(n / max(1, round(n ** (1 / 3)))) if n else 0

    def sums(self, x: np.ndarray) -> np.ndarray:
        """The bootstrap replicates of `x.sum()` (one per resample)."""
        return self.sums_many([x])[0]

    def sums_many(self, xs: list[np.ndarray]) -> np.ndarray:
        """The bootstrap replicates of each series' sum: an array (series, resamples).

        A replicate is the sum of the drawn blocks' window sums. The window sums of every start
        are computed once per series, laid out (start, series), and the draws become a sparse
        count matrix (resamples x starts, one entry per draw): one sparse product gives every
        series' replicates. Series by series, with two prefix-sum look-ups per draw, diff of two
        10M-span recordings spent most of its time here; now it is a few hundredths of a second."""
        from scipy.sparse import csr_matrix

        resamples = len(self.starts)
        if self.n == 0 or not xs:
            return np.zeros((len(xs), resamples))
        n, last = self.n, int(self.lengths[-1])
        x = np.stack([np.asarray(v, np.float64) for v in xs])
        wrapped = np.concatenate([x, x[:, : self.block]], axis=1)
        prefix = np.zeros((len(xs), wrapped.shape[1] + 1))
        np.cumsum(wrapped, axis=1, out=prefix[:, 1:])
        full = np.ascontiguousarray((prefix[:, self.block: self.block + n] - prefix[:, :n]).T)  # every block but the last
        tail = np.ascontiguousarray((prefix[:, last: last + n] - prefix[:, :n]).T)
        body, ends = self.starts[:, :-1], self.starts[:, -1]
        per_row = body.shape[1]
        out = np.empty((resamples, len(xs)))
        step = max(1, self.CHUNK // max(1, per_row))  # bounds the count matrix: CHUNK draws at a time
        for i in range(0, resamples, step):
            rows = body[i: i + step]
            counts = csr_matrix((np.ones(rows.size), rows.ravel(), np.arange(0, rows.size + 1, max(per_row, 1))
                                 if per_row else np.zeros(len(rows) + 1, np.int64)), shape=(len(rows), n))
            out[i: i + step] = counts @ full + tail[ends[i: i + step]]
        return out.T


def _interval(samples: np.ndarray) -> tuple[float, float]:
    kept = samples[np.isfinite(samples)]
    if len(kept) == 0:
        return math.nan, math.nan
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(kept, [alpha, 1 - alpha])
    return float(lo), float(hi)


class _Resampled:
    """One recording's per-iteration table plus its bootstrap resampling."""

    def __init__(self, table: IterationTable, rng: np.random.Generator, resamples: int) -> None:
        self.t = table
        self.boot = BlockBootstrap(table.iterations, resamples, rng)
        self.series = {"latency": table.latencies_ns, "comm": table.comm, "comm_update": table.comm_update,
                       "exec": table.exec, "process": table.process,
                       **{f"top:{k}": v for k, v in table.top.items()},
                       **{f"phase:{k}": v for k, v in table.phases.items()}}
        self._reps = dict(zip(self.series, self.boot.sums_many(list(self.series.values())), strict=True))
        self._resamples = resamples

    def sums(self, key: str) -> tuple[float, np.ndarray]:
        """The total of a per-iteration series, and its bootstrap replicates (a phase the table does
        not have: zero)."""
        if key not in self.series:
            return 0.0, np.zeros(self._resamples)
        return float(self.series[key].sum()), self._reps[key]


def _pct_change(a: float, b: float) -> float:
    return (b / a - 1) * 100 if a > 0 else math.inf


def _verdict(lo: float, hi: float, up: str, down: str, relative_pct: float = math.inf,
             min_change: float = 0.0) -> str:
    """`up`/`down` when the interval excludes zero and the change is at least `min_change`
    percent of the baseline; else "within noise"."""
    if math.isnan(lo) or math.isnan(hi) or abs(relative_pct) < min_change:
        return "within noise"
    if lo > 0:
        return up
    if hi < 0:
        return down
    return "within noise"


@dataclass
class Side:
    """One recording as diff compares it: its Snapshot and the iterations it compares."""

    path: str
    snapshot: Snapshot
    table: IterationTable


def read_side(rec: Recording, skip: int = 0, *, exact: bool = False) -> Side:
    """The figures of `rec` over its iterations after the first and `skip` more (`exact`: from
    every span rather than the recording's aggregates); raises RecordingError when it holds too
    few iterations to compare (or a bound is exceeded)."""
    snap, table = read_iterations(rec, exact=exact, totals=False)  # every figure from the table
    if snap.iterations == 0:
        raise RecordingError(f"{rec.path}: no complete iteration recorded, nothing to compare")
    if table.iterations - skip < 2:
        skipped = f" and --skip {skip}" if skip else ""
        raise RecordingError(f"{rec.path}: only {snap.iterations} complete iterations, too few to compare "
                             f"(the first is start-up{skipped})")
    return Side(str(rec.path), snap, table.after(skip))


def compare(a: Side, b: Side, *, resamples: int = RESAMPLES, seed: int = 0,
            min_change: float = MIN_CHANGE_PCT) -> Diff:
    """Compare two recordings (read with `read_side`); raises BoundExceeded when the bootstrap
    would need more than its bound."""
    sides = [(a.snapshot, a.table), (b.snapshot, b.table)]
    (sa, ta), (sb, tb) = sides
    rng = np.random.default_rng(seed)
    A, B = _Resampled(ta, rng, resamples), _Resampled(tb, rng, resamples)
    na, nb = ta.iterations, tb.iterations
    rows: list[Row] = []

    # IPS as metrics defines it (the Snapshot's, over the same iterations); positive change = B faster.
    _, la_r = A.sums("latency")
    _, lb_r = B.sums("latency")
    ips_a, ips_b = ta.ips, tb.ips
    with np.errstate(divide="ignore", invalid="ignore"):
        rep = (la_r / na) / (lb_r / nb) * 100 - 100
    lo, hi = _interval(rep)
    change = _pct_change(ips_a, ips_b)
    rows.append(Row("IPS", ips_a, ips_b, "IPS", change, lo, hi, "%",
                    _verdict(lo, hi, "faster", "slower", change, min_change)))

    # Shares: ratio of two per-iteration series; change in percentage points.
    def share(figure: str, num: str, den: str) -> None:
        (va, ra), (wa, qa) = A.sums(num), A.sums(den)
        (vb, rb), (wb, qb) = B.sums(num), B.sums(den)
        if wa <= 0 and wb <= 0:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            sa_ = va / wa * 100 if wa > 0 else math.nan
            sb_ = vb / wb * 100 if wb > 0 else math.nan
            lo, hi = _interval(rb / qb * 100 - ra / qa * 100)
        rel = (sb_ - sa_) / sa_ * 100 if sa_ > 0 else math.inf  # the change as a share of the baseline share
        rows.append(Row(figure, sa_, sb_, "%", sb_ - sa_, lo, hi, "pp",
                        _verdict(lo, hi, "higher", "lower", rel, min_change)))

    share("comm share of execution", "comm", "exec")
    share("comm share of update", "comm_update", "top:update")
    for top in ("sample", "update", "sync"):
        share(f"{top} share", f"top:{top}", "process")

    # Phases: mean time per iteration (all processes); positive change = B slower.
    for name in sorted(set(ta.phases) | set(tb.phases)):
        (va, ra), (vb, rb) = A.sums(f"phase:{name}"), B.sums(f"phase:{name}")
        ma, mb = va / na / 1e6, vb / nb / 1e6
        if va == 0 or vb == 0:
            rows.append(Row(name, ma, mb, "ms/it", math.nan, math.nan, math.nan, "%",
                            "new" if va == 0 else "gone"))
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            lo, hi = _interval(((rb / nb) / (ra / na) - 1) * 100)
        change = _pct_change(ma, mb)
        rows.append(Row(name, ma, mb, "ms/it", change, lo, hi, "%",
                        _verdict(lo, hi, "slower", "faster", change, min_change)))

    header, notes = _header(sa, sb, na, nb)
    return Diff(a.path, b.path, header, notes, rows)


def _header(sa: Snapshot, sb: Snapshot, na: int, nb: int) -> tuple[dict[str, Any], list[str]]:
    # The recordings' iteration counts (as `summary` gives them), and how many were compared: all
    # but the first (start-up) and any left out with --skip.
    header: dict[str, Any] = {"iterations": [sa.iterations, sb.iterations], "compared_iterations": [na, nb]}
    notes: list[str] = []
    for key in ("algo", "env", "agents", "workers"):
        va = getattr(sa.info, key, None) if sa.info else None
        vb = getattr(sb.info, key, None) if sb.info else None
        header[key] = [va, vb]
        if va != vb:
            notes.append(f"{key} differ: {va} vs {vb}")
    ca = (sa.info.extra.get("config") if sa.info else None) or {}
    cb = (sb.info.extra.get("config") if sb.info else None) or {}
    changed = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k) and k not in ("agents", "workers", "env"))
    if changed:
        notes.append("settings differ: " + ", ".join(f"{k} {ca.get(k)} vs {cb.get(k)}" for k in changed))
    for snap, label in ((sa, "A"), (sb, "B")):
        if not snap.complete:
            notes.append(f"{label} is truncated (no end-of-run marker)")
    return header, notes


def _num(x: float, unit: str) -> str:
    if math.isnan(x):
        return "-"
    if unit == "%":
        return f"{x:.1f}%"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def _change(r: Row) -> str:
    if math.isnan(r.change) or math.isinf(r.change):
        return "-"
    u = "%" if r.change_unit == "%" else " pp"
    ci = "" if math.isnan(r.lo) else f" [{r.lo:+.1f}, {r.hi:+.1f}]"
    return f"{r.change:+.1f}{u}{ci}"


def render(d: Diff) -> str:
    h = d.header
    lines = [f"{side}: {path}  ({h['algo'][i]}, {h['env'][i]}, {plural(h['agents'][i], 'agent')}, "
             f"{plural(h['workers'][i], 'worker')}, {plural(h['iterations'][i], 'iteration')}, "
             f"{h['compared_iterations'][i]} compared)"
             for i, (side, path) in enumerate((("A", d.a_path), ("B", d.b_path)))]
    lines += [f"note: {n}" for n in d.notes]
    lines.append(f"change B vs A with a {CONFIDENCE:.0%} block-bootstrap interval over iterations; "
                 "a verdict only where it excludes zero")
    lines.append("")
    head = f"{'figure':<32} {'A':>10} {'B':>10} {'change [95% CI]':>28}  verdict"
    lines += [head, "-" * len(head)]
    section = None
    for r in d.rows:
        kind = "phases (ms per iteration, all processes)" if r.unit == "ms/it" else "run"
        if kind != section:
            if section is not None:
                lines.append("")
            lines.append(kind)
            section = kind
        lines.append(f"  {r.figure:<30} {_num(r.a, r.unit):>10} {_num(r.b, r.unit):>10} {_change(r):>28}  {r.verdict}")
    significant = [r.figure for r in d.rows if r.verdict not in ("within noise",)]
    lines.append("")
    lines.append("significant: " + (", ".join(significant) if significant else "nothing, all within noise"))
    return "\n".join(printable(line) for line in lines)  # names and settings come from the files


"""Span aggregates: what a recording keeps beside its spans so figures need not read every span.

The writer (recording.py) folds the spans of each stretch of the run (at most `SPANS_PER_GROUP`
spans, or `GROUP_S` seconds) into three kinds of rows, written in batches of their own after the
span batches they cover (docs/recording-format.md, "Batches"):

- `span_sum`: per (process, phase, parent), the number of spans (`value`) and their summed
  duration (`dur_ns`), start-up (iteration 0, `iter` 0) apart from the rest (`iter` null). Exact:
  every total, count and share comes out the same as from the spans.
- `span_iter` (in a batch of its own, which only diff reads): per (phase, parent, iteration >= 1),
  the spans' count and summed duration over all processes: diff's per-iteration table, exact.
- `span_hist`: per phase (and per process for iteration 0, start-up), a log-bucket histogram of
  durations: bucket `bin` holds the spans of duration in [2^(bin/32), 2^((bin+1)/32)) ns, `value`
  the count. Two histograms merge by adding counts (as HdrHistogram, DDSketch and Prometheus
  native histograms do), and a percentile read at the bucket's geometric centre is within 1.1%
  of the exact one (docs/metrics.md).

The histogram's definition lives here, once: Metrics builds its per-phase histograms from spans
with `bins` and reads them with `quantiles_from_hist`, and so do the aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

# 32 log-spaced bins per octave: bin width 2^(1/32) = 1.0219, so the geometric centre of a bin
# is within 2^(1/64) - 1 = 1.09% of any value in it; from 1 ns to 2^41 ns (37 minutes), longer
# spans in the last bin.
BINS_PER_OCTAVE = 32
N_BINS = 41 * BINS_PER_OCTAVE
RELATIVE_ERROR = 2 ** (1 / (2 * BINS_PER_OCTAVE)) - 1  # 0.0109

# How much the writer folds into one aggregate batch: bounded so that a reader that cannot use
# an aggregate (replay's playhead inside it, a file cut before it) reads few spans exactly.
SPANS_PER_GROUP = 1 << 16
GROUP_S = 30.0


def bins(durations_ns: np.ndarray) -> np.ndarray:
    """The histogram bin of each duration (ns)."""
    d = np.maximum(durations_ns, 1).astype(np.float64)
    return np.minimum((np.log2(d) * BINS_PER_OCTAVE).astype(np.int64), N_BINS - 1)


def quantiles_from_hist(hist: np.ndarray, qs: Iterable[float]) -> list[float]:
    """Quantiles (ns) from a latency histogram, read at the geometric centre of the bin: within
    RELATIVE_ERROR of the exact value of the same rank (the ceil(q * n)-th smallest)."""
    qs = list(qs)
    total = int(hist.sum())
    if total == 0:
        return [math.nan for _ in qs]
    cum = np.cumsum(hist)
    out = []
    for q in qs:
        idx = int(np.searchsorted(cum, max(1, math.ceil(q * total)), side="left"))
        out.append(2.0 ** ((idx + 0.5) / BINS_PER_OCTAVE))
    return out


def exact_quantiles(values: np.ndarray, qs: Iterable[float]) -> list[float]:
    """The exact quantiles the histogram approximates: the ceil(q * n)-th smallest value."""
    v = np.sort(np.asarray(values))
    if len(v) == 0:
        return [math.nan for _ in qs]
    return [float(v[max(1, math.ceil(q * len(v))) - 1]) for q in qs]


def group_rows(keys: list[np.ndarray], values: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Group rows by the integer columns `keys` (each >= -1): the distinct key tuples, the number
    of rows of each, and the sum of each of `values` over them (float64: exact below 2^53).

    The keys are packed into one integer by their ranges; where the packed range is small (a run's
    processes, phases, parents, bins, a group's iterations: always, in practice) the groups are
    counted with bincount, else found by sorting."""
    if not len(keys[0]):
        return [k[:0] for k in keys], np.zeros(0, np.int64), [np.zeros(0) for _ in values]
    lows = [int(k.min()) for k in keys]
    spans = [int(k.max()) - lo + 1 for k, lo in zip(keys, lows, strict=True)]
    packed = np.zeros(len(keys[0]), np.int64)
    for k, lo, sp in zip(keys, lows, spans, strict=True):
        packed = packed * sp + (k - lo)
    size = int(np.prod(spans, dtype=np.float64))
    if size <= 1 << 22:
        counts = np.bincount(packed, minlength=size)
        present = np.flatnonzero(counts)
        sums = [np.bincount(packed, weights=v, minlength=size)[present] for v in values]
        counts = counts[present]
    else:
        present, inverse = np.unique(packed, return_inverse=True)
        counts = np.bincount(inverse)
        sums = [np.bincount(inverse, weights=v) for v in values]
    out = []
    rest = present
    for lo, sp in zip(lows[::-1], spans[::-1], strict=True):
        out.append(rest % sp + lo)
        rest = rest // sp
    return out[::-1], counts, sums


def fold(proc: np.ndarray, name: np.ndarray, parent: np.ndarray, it: np.ndarray, dur: np.ndarray
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The aggregates of a set of spans, given as integer columns (-1 for a null parent or iteration).

    Returns (sums, hists, iterations):
    - sums: per (proc, name, parent, first) the `count` and `total` (ns), where `first` is True
      for the spans of the process's iteration 0 (start-up, which Metrics keeps apart) and False
      for every other span (-1 in `iter`, as for a span without an iteration: both count as steady);
    - hists: per (proc, name, first, bin) the `count`, with `proc` -1 unless `first` (steady spans
      are merged over processes, start-up kept per process as Metrics keeps it);
    - iterations: per (name, parent, iter) for iterations 1 and later, the `count` and `total`
      summed over processes: diff's per-iteration table (iteration k of every process in one row)."""
    first = it == 0
    sit = np.where(first, 0, -1)
    (sproc, sname, sparent, siter), count, (total,) = group_rows([proc, name, parent, sit], [dur])
    sums = {"proc": sproc, "name": sname, "parent": sparent, "iter": siter, "count": count,
            "total": np.rint(total).astype(np.int64)}
    hproc = np.where(first, proc, -1)
    (hp, hname, hbin), count, _ = group_rows([hproc, name, bins(dur)], [])
    hists = {"proc": hp, "name": hname, "bin": hbin, "count": count, "first": hp >= 0}
    later = it >= 1
    (iname, iparent, iiter), count, (total,) = group_rows([name[later], parent[later], it[later]], [dur[later]])
    iterations = {"name": iname, "parent": iparent, "iter": iiter, "count": count,
                  "total": np.rint(total).astype(np.int64)}
    return sums, hists, iterations

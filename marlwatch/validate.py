"""The reading boundary: what a recording may hold, checked once, as it is read.

A recording is untrusted input (someone else's run, a damaged copy, a crafted file). The reader
(`recording.Recording.batches`) passes every batch through a `BatchChecker` and the run metadata
through `read_info`, so everything past them can rely on what each row kind promises: the
columns a kind uses are set, numbers are finite and in range, strings are of bounded length,
an event's detail is a JSON object, and the number of distinct phase and counter names (what
the figures allocate per name) is bounded. What fails is skipped and counted (`Skipped`), never
fixed up; the commands warn once. Bounds and what is skipped: docs/recording-format.md,
"Reading untrusted files".
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.aggregates import N_BINS
from marlwatch.schema import (
    BATCH_SEQ_KEY,
    CORE,
    COUNTER,
    EVENT,
    ITER,
    KINDS,
    PROC,
    SPAN,
    SPAN_HIST,
    SPAN_ITER,
    SPAN_SUM,
    STACK,
    RecordingError,
    RunInfo,
    kind_codes,
)

# -- bounds -------------------------------------------------------------------------------------
# Each figure costs memory per distinct name (a latency histogram of 10 KB per phase; diff a
# value per phase and iteration), per process slot (a row in the app) and per core. A real run
# has tens of phases and at most a few hundred processes and cores.
MAX_PHASES = 1000  # distinct phase names (span names and parents, stack rows' phases)
MAX_COUNTERS = 1000  # distinct counter/gauge names
MAX_FUNCTIONS = 100_000  # distinct (phase, function) pairs py-spy found
MAX_PROCS = 256  # process slots 0..255
MAX_CORES = 1024  # cores 0..1023
MAX_NAME_BYTES = 1024  # a phase, counter or event name
MAX_TEXT_BYTES = 1 << 20  # an event's detail, a folded stack
MAX_METADATA_BYTES = 1 << 20  # the run metadata (JSON)
MAX_JSON_DEPTH = 32  # nesting of the metadata and of event details
MAX_T_NS = 1 << 60  # |t_ns|: 36 years
MAX_DUR_NS = 1 << 50  # a span: 13 days
MAX_ITER = 1 << 40
MAX_SAMPLES = 1 << 31  # py-spy samples in one stack row
MAX_SPANS = 1 << 40  # spans an aggregate row counts
# diff: its per-iteration table holds a value per phase series and iteration, and its bootstrap
# a block start per resample and block (about iterations^(2/3) blocks).
MAX_DIFF_VALUES = 1 << 24  # 16.8 M values: 134 MB
MAX_BOOTSTRAP_DRAWS = 1 << 24  # 16.8 M block starts: 67 MB
MAX_RESAMPLES = 100_000

# Why a row was skipped (the words of the warning).
MISSING = "missing a value its kind needs"
RANGE = "out of range"
NOT_FINITE = "NaN or infinite"
TOO_LONG = "too long"
BAD_JSON = "detail not a JSON object"
UNKNOWN = "of an unknown kind"
PAST_PHASES = f"past {MAX_PHASES:,} phase names"
PAST_COUNTERS = f"past {MAX_COUNTERS:,} counter names"
PAST_FUNCTIONS = f"past {MAX_FUNCTIONS:,} sampled functions"


class BoundExceeded(RecordingError):
    """A file (with the flags given) would make marlwatch allocate more than a documented bound."""


# -- JSON -----------------------------------------------------------------------------------------
def _finite_float(text: str) -> float | None:
    x = float(text)
    return x if math.isfinite(x) else None


def _depth_over(value: Any, limit: int) -> bool:
    todo = [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            if d > limit:
                return True
            todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def load_json(text: str | bytes, *, max_bytes: int = MAX_TEXT_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON from a file: NaN, Infinity and numbers too large for a float become None (they
    are not JSON, and would make marlwatch's own JSON output invalid); raises ValueError for
    text that is not JSON, too long, or nested deeper than `max_depth` (json.loads itself
    raises RecursionError at some 1,000 levels, and deep values crash later recursion)."""
    if len(text) > max_bytes:
        raise ValueError(f"longer than {max_bytes:,} bytes")
    try:
        value = json.loads(text, parse_constant=lambda _: None, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _depth_over(value, max_depth):
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


def json_object(text: str | None) -> dict[str, Any] | None:
    """An event's detail: a JSON object ({} for no text), or None when it is not one."""
    if not text:
        return {}
    try:
        value = load_json(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- run metadata -------------------------------------------------------------------------------
def _slot(key: Any) -> bool:
    return isinstance(key, str) and key.isdigit() and str(int(key)) == key and int(key) < MAX_PROCS


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_info(raw: str | bytes) -> tuple[RunInfo, int]:
    """The run metadata as a RunInfo, and how many of its entries were dropped as invalid.

    The fields every reader needs (algo, env, agents, workers, seed, iterations) must be there
    with their types (else ValueError: the file is not usable); in the others an invalid entry
    is dropped: a process slot out of range or a role that is not a string, a core that is not
    a core, a `latency_bound_ms` that is not a positive number, a `config` that is not an object."""
    data = load_json(raw, max_bytes=MAX_METADATA_BYTES)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    dropped = 0
    fields = RunInfo.__dataclass_fields__
    known = {k: v for k, v in data.items() if k in fields}
    for k in ("algo", "env"):
        if not isinstance(known.get(k), str):
            raise ValueError(f"field {k!r} is missing or not a string")
    for k in ("agents", "workers", "seed"):
        if not _is_int(known.get(k)):
            raise ValueError(f"field {k!r} is missing or not a whole number")
    if "iterations" not in known or not (known["iterations"] is None or _is_int(known["iterations"])):
        raise ValueError("field 'iterations' is missing or not a whole number")
    optional: dict[str, Any] = {"spans": lambda v: isinstance(v, bool), "host": lambda v: isinstance(v, str),
                                "cores": _is_int, "start_unix": lambda v: isinstance(v, int | float) and v is not None,
                                "format_version": _is_int}
    for k, ok in optional.items():
        if k in known and not ok(known[k]):
            del known[k]
            dropped += 1
    for k in ("versions", "pinning", "procs", "extra"):
        if k in known and not isinstance(known[k], dict):
            del known[k]
            dropped += 1
    entry_ok = {
        "versions": lambda s, v: isinstance(v, str),
        "procs": lambda s, v: _slot(s) and isinstance(v, str) and len(v.encode()) <= MAX_NAME_BYTES,
        "pinning": lambda s, v: _slot(s) and (v is None or (_is_int(v) and 0 <= v < MAX_CORES)),
    }
    for k, ok in entry_ok.items():
        if k in known:
            kept = {s: v for s, v in known[k].items() if ok(s, v)}
            dropped += len(known[k]) - len(kept)
            known[k] = kept
    extra = known.get("extra") or {}
    bound = extra.get("latency_bound_ms")
    if "latency_bound_ms" in extra and not (isinstance(bound, int | float) and not isinstance(bound, bool)
                                              and bound > 0):
        del extra["latency_bound_ms"]
        dropped += 1
    if "config" in extra and not isinstance(extra["config"], dict):
        del extra["config"]
        dropped += 1
    return RunInfo(**known), dropped


# -- rows ------------------------------------------------------------------------------------
@dataclass
class Skipped:
    """What the reader left out of a file, for the one warning a command prints."""

    rows: Counter = field(default_factory=Counter)  # reason -> rows
    batches_repeated: int = 0  # a batch number (or iteration) seen before: duplicated or moved
    batches_missing: int = 0  # numbers skipped between two batches
    metadata: int = 0  # metadata entries dropped

    def reset(self) -> None:
        """Forget the rows and batches of a pass over the file (the metadata stays as it was)."""
        self.rows.clear()
        self.batches_repeated = self.batches_missing = 0

    def __bool__(self) -> bool:
        return bool(self.rows or self.batches_repeated or self.batches_missing or self.metadata)

    def describe(self) -> str:
        parts = []
        if self.rows:
            why = ", ".join(f"{n:,} {reason}" for reason, n in self.rows.most_common())
            parts.append(f"skipped {_count(sum(self.rows.values()), 'row')} ({why})")
        if self.batches_repeated:
            parts.append(f"skipped {_count(self.batches_repeated, 'batch')} repeating earlier ones "
                         "(duplicated or out of order)")
        if self.batches_missing:
            parts.append(f"{_count(self.batches_missing, 'batch')} missing from the middle")
        if self.metadata:
            parts.append(f"ignored {_count(self.metadata, 'invalid run metadata entry')}")
        return "; ".join(parts)


def _count(n: int, what: str) -> str:
    if n == 1:
        return f"1 {what}"
    plural = what[:-1] + "ies" if what.endswith("y") else what + ("es" if what.endswith("ch") else "s")
    return f"{n:,} {plural}"


class _Columns:
    """A batch's columns as numpy arrays and their column-wide facts, each made once, when a rule
    needs it. Most batches are valid: a column whose nulls, minimum and maximum already satisfy a
    rule for every row is not checked row by row (that kept the reader's cost to a few percent)."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.b = batch
        self._cache: dict[tuple[str, str], Any] = {}

    def _memo(self, what: str, name: str, make: Any) -> Any:
        key = (what, name)
        if key not in self._cache:
            self._cache[key] = make(self.b.column(name))
        return self._cache[key]

    def has_nulls(self, name: str) -> bool:
        return self.b.column(name).null_count > 0

    def null(self, name: str) -> np.ndarray:
        return self._memo("null", name, lambda col: pc.is_null(col).to_numpy(zero_copy_only=False))

    def values(self, name: str) -> np.ndarray:
        return self._memo("values", name, lambda col: (col.to_numpy(zero_copy_only=False) if col.null_count == 0
                                                         else pc.fill_null(col, 0).to_numpy(zero_copy_only=False)))

    def min_max(self, name: str) -> tuple[Any, Any]:
        def make(col: pa.Array) -> tuple[Any, Any]:
            mm = pc.min_max(col)
            return mm["min"].as_py(), mm["max"].as_py()
        return self._memo("min_max", name, make)

    def nbytes(self, name: str) -> np.ndarray:
        """Each row's string length in bytes (0 for null)."""
        def make(col: pa.Array) -> np.ndarray:
            if not pa.types.is_dictionary(col.type):
                return pc.fill_null(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)
            lengths = np.append(pc.fill_null(pc.binary_length(col.dictionary), 0).to_numpy(zero_copy_only=False), 0)
            return lengths[pc.fill_null(col.indices, len(col.dictionary)).to_numpy(zero_copy_only=False)]
        return self._memo("bytes", name, make)

    def nbytes_range(self, name: str) -> tuple[Any, Any]:
        """The shortest and longest string (None, None when all are null). For a dictionary
        column those of its dictionary, unused values too: only a file whose dictionary holds an
        empty or too long value has its rows checked one by one."""
        def make(col: pa.Array) -> tuple[Any, Any]:
            if pa.types.is_dictionary(col.type):
                if col.null_count == len(col):
                    return None, None
                col = col.dictionary
                if col.null_count:
                    return 0, pc.max(pc.binary_length(col)).as_py()
            mm = pc.min_max(pc.binary_length(col))
            return mm["min"].as_py(), mm["max"].as_py()
        return self._memo("bytes_range", name, make)


class BatchChecker:
    """Checks the batches of one pass over a file, in order; `skipped` says what it left out."""

    def __init__(self, skipped: Skipped | None = None) -> None:
        self.skipped = skipped if skipped is not None else Skipped()
        self.valid_rows = 0
        self._last_seq = -1
        self._last_iter: dict[int, int] = {}  # proc -> highest iteration seen (files without numbers)

    def check(self, batch: pa.RecordBatch, metadata: pa.KeyValueMetadata | None = None, *,
              sequence: bool = True) -> pa.RecordBatch | None:
        """The batch's valid rows, or None when the whole batch is to be skipped. Without
        `sequence` its number is not checked (it was, by `passed`)."""
        if sequence and self.repeated(batch, metadata):
            return None
        return self.rows(batch)

    def repeated(self, batch: pa.RecordBatch, metadata: pa.KeyValueMetadata | dict | None) -> bool:
        """Whether the batch repeats one read before (counted; to be skipped whole)."""
        numbered = metadata is not None and _seq(metadata.get(BATCH_SEQ_KEY)) is not None
        kinds, codes = ([], np.zeros(0, np.int32)) if numbered else kind_codes(batch)  # only old files need them
        if self._repeated(batch, metadata, kinds, codes):
            self.skipped.batches_repeated += 1
            return True
        return False

    def rows(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch's valid rows (the reader checks several small batches at once: a check costs
        a dozen Arrow kernels whatever the rows)."""
        ok = self.valid(batch)
        return batch if ok.all() else batch.filter(pa.array(ok))

    def valid(self, batch: pa.RecordBatch) -> np.ndarray:
        """Which rows of the batch are valid (the others are counted in `skipped`)."""
        kinds, codes = kind_codes(batch)
        ok = self._rows(batch, kinds, codes)
        self.valid_rows += np.count_nonzero(ok)
        return ok

    # -- batch order ---------------------------------------------------------------------------
    def passed(self, metadata: dict[bytes, bytes]) -> None:
        """A numbered batch the reader did not decode (spans an aggregate stands for, or an
        aggregate it did not need): its number still counts in the batch order."""
        seq = _seq(metadata.get(BATCH_SEQ_KEY))
        if seq is not None and seq > self._last_seq:
            self.skipped.batches_missing += seq - self._last_seq - 1
            self._last_seq = seq

    def _repeated(self, batch: pa.RecordBatch, metadata: pa.KeyValueMetadata | None, kinds: list[str],
                  codes: np.ndarray) -> bool:
        seq = _seq(metadata.get(BATCH_SEQ_KEY)) if metadata is not None else None
        if seq is not None:
            if seq <= self._last_seq:
                return True
            self.skipped.batches_missing += seq - self._last_seq - 1
            self._last_seq = seq
            return False
        # A file written before batches were numbered: each process's iterations only go up, so
        # a batch whose iteration rows do not is a copy of (or older than) one already read.
        if ITER not in kinds:
            return False
        sel = codes == kinds.index(ITER)
        procs = pc.fill_null(batch.column("proc"), -1).to_numpy(zero_copy_only=False)[sel]
        iters = pc.fill_null(batch.column("iter"), -1).to_numpy(zero_copy_only=False)[sel]
        lows, highs = {}, {}
        for p in np.unique(procs).tolist():
            mine = iters[procs == p]
            lows[p], highs[p] = int(mine.min()), int(mine.max())
        if any(low <= self._last_iter.get(p, -1) for p, low in lows.items() if p >= 0 and low >= 0):
            return True
        for p, high in highs.items():
            self._last_iter[p] = max(self._last_iter.get(p, -1), high)
        return False

    # -- rows of each kind -----------------------------------------------------------------------
    def _rows(self, batch: pa.RecordBatch, kinds: list[str], codes: np.ndarray) -> np.ndarray:
        n = batch.num_rows
        c = _Columns(batch)
        ok = np.ones(n, bool)
        why = self.skipped.rows

        def drop(bad: np.ndarray, reason: str) -> None:
            bad = bad & ok
            count = np.count_nonzero(bad)  # a popcount: sum() converts every row to an integer first
            if count:
                why[reason] += count
                ok[bad] = False

        if any(k not in KINDS for k in kinds) or enc_has_null(codes):
            known = [i for i, k in enumerate(kinds) if k in KINDS]
            drop(~np.isin(codes, known), UNKNOWN)

        def in_range(col: str, lo: int, hi: int, sel: np.ndarray, optional: bool = False) -> None:
            if c.has_nulls(col):
                null = c.null(col)
                if not optional:
                    drop(sel & null, MISSING)
            else:
                null = None
            low, high = c.min_max(col)
            if low is None or (lo <= low and high <= hi):
                return  # every value of the column is in range
            v = c.values(col)
            bad = (v < lo) | (v > hi)
            drop(sel & bad if null is None else sel & ~null & bad, RANGE)

        def named(col: str, sel: np.ndarray, optional: bool = False, limit: int = MAX_NAME_BYTES) -> None:
            if c.has_nulls(col) and not optional:
                drop(sel & c.null(col), MISSING)
            shortest, longest = c.nbytes_range(col)
            if shortest is None:
                return
            if shortest == 0 and not optional:
                drop(sel & (c.nbytes(col) == 0), MISSING)  # null ones were dropped just above
            if longest > limit:
                drop(sel & (c.nbytes(col) > limit), TOO_LONG)

        def finite(col: str, sel: np.ndarray) -> None:
            if c.has_nulls(col):
                drop(sel & c.null(col), MISSING)
            v = c.values(col)
            bad = ~np.isfinite(v)
            if bad.any():
                drop(sel & bad, NOT_FINITE)

        def counted(sel: np.ndarray) -> None:
            finite("value", sel)
            v = c.values("value")
            drop(sel & ((v < 1) | (v > MAX_SPANS)), RANGE)

        in_range("t_ns", -MAX_T_NS, MAX_T_NS, np.ones(n, bool))
        for i, kind in enumerate(kinds):
            sel = codes == i
            if kind == SPAN:
                in_range("proc", 0, MAX_PROCS - 1, sel)
                named("name", sel)
                named("parent", sel, optional=True)
                in_range("dur_ns", 0, MAX_DUR_NS, sel)
                in_range("iter", 0, MAX_ITER, sel, optional=True)
            elif kind == ITER:
                in_range("proc", 0, MAX_PROCS - 1, sel)
                in_range("iter", 0, MAX_ITER, sel)
            elif kind == COUNTER:
                in_range("proc", 0, MAX_PROCS - 1, sel, optional=True)
                named("name", sel)
                finite("value", sel)
            elif kind == CORE:
                in_range("core", 0, MAX_CORES - 1, sel)
                finite("value", sel)
            elif kind == PROC:
                in_range("proc", 0, MAX_PROCS - 1, sel)
                named("name", sel)
                finite("value", sel)
            elif kind == STACK:
                in_range("proc", 0, MAX_PROCS - 1, sel)
                named("name", sel)
                named("text", sel, limit=MAX_TEXT_BYTES)
                finite("value", sel)
                v = c.values("value")
                drop(sel & ((v < 1) | (v > MAX_SAMPLES)), RANGE)
                in_range("dur_ns", 0, MAX_DUR_NS, sel, optional=True)
                in_range("iter", 0, MAX_ITER, sel, optional=True)
            elif kind == SPAN_SUM:
                in_range("proc", 0, MAX_PROCS - 1, sel)
                named("name", sel)
                named("parent", sel, optional=True)
                in_range("dur_ns", 0, MAX_T_NS, sel)
                in_range("iter", 0, 0, sel, optional=True)
                counted(sel)
            elif kind == SPAN_ITER:
                in_range("proc", 0, MAX_PROCS - 1, sel, optional=True)
                named("name", sel)
                named("parent", sel, optional=True)
                in_range("dur_ns", 0, MAX_T_NS, sel)
                in_range("iter", 1, MAX_ITER, sel)
                counted(sel)
            elif kind == SPAN_HIST:
                in_range("proc", 0, MAX_PROCS - 1, sel, optional=True)
                named("name", sel)
                in_range("bin", 0, N_BINS - 1, sel)
                in_range("iter", 0, 0, sel, optional=True)
                counted(sel)
            elif kind == EVENT:
                in_range("proc", 0, MAX_PROCS - 1, sel, optional=True)
                named("name", sel)
                named("text", sel, optional=True, limit=MAX_TEXT_BYTES)
                rows = np.flatnonzero(sel & ok)
                if len(rows):
                    texts = batch.column("text").take(pa.array(rows)).to_pylist()
                    bad = np.zeros(n, bool)
                    bad[rows] = [json_object(t) is None for t in texts]
                    drop(bad, BAD_JSON)
        return ok


def _seq(raw: bytes | None) -> int | None:
    return int(raw) if raw is not None and raw.isdigit() and len(raw) < 19 else None


def enc_has_null(codes: np.ndarray) -> bool:
    return bool(len(codes)) and int(codes.min()) < 0


class NameBound:
    """At most `bound` distinct names, first come first kept (the new names of one batch in
    sorted order, so every reader of a file keeps the same ones). For what allocates per name:
    the phases of Metrics and of diff's table, the counters."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.names: set[str] = set()

    def admit(self, names: list[str | None]) -> list[bool]:
        """For each of `names` (the distinct names of a batch), whether it is kept."""
        new = sorted({s for s in names if s is not None and s not in self.names})
        room = self.bound - len(self.names)
        self.names.update(new[:max(0, room)])
        return [s in self.names for s in names]

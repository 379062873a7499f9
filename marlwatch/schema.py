"""What a recording is made of: its row kinds, the one Arrow schema every row has, the keys of
its metadata, the run's description (`RunInfo`), and the error of a file that is not a recording
(docs/recording-format.md). The writer and the reader (marlwatch/recording.py) and the reading
boundary (marlwatch/validate.py) share these; this module needs neither.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.nodes import node_details

METADATA_KEY = b"marlwatch.run"
# The format's version, in the schema metadata (and the run metadata's `format_version`). 1: the
# first format (strings for kind/name/parent, no aggregates; files without this key). 2: those
# columns dictionary-encoded, span rows in batches of their own, aggregates (docs/recording-format.md).
FORMAT_KEY = b"marlwatch.format"
FORMAT_VERSION = 2
# Each record batch carries its number in the file (0, 1, ...) in its own custom metadata, so a
# reader can tell a batch repeated or moved (a file spliced by hand or by a broken copy) from
# new rows. Files written before it have none; readers fall back to the iteration order.
BATCH_SEQ_KEY = b"marlwatch.seq"
# What a batch holds (format 2): `spans` (span rows only), `aggregates` (span_sum and span_hist
# rows), `iterations` (span_iter rows), `rows` (everything else); with the range of its rows' t_ns, and for aggregates the
# numbers of the span batches they summarise. Read from the message header without decoding
# the batch (marlwatch/ipcscan.py), so a reader skips what it does not need.
BATCH_PART_KEY = b"marlwatch.part"
BATCH_TIME_KEY = b"marlwatch.t"
BATCH_COVERS_KEY = b"marlwatch.covers"
SPANS_PART, AGGREGATES_PART, ITERATIONS_PART, ROWS_PART = b"spans", b"aggregates", b"iterations", b"rows"

# Row kinds. One schema for all of them keeps the file a single stream any Arrow reader opens.
SPAN, ITER, COUNTER, CORE, PROC, EVENT, END = "span", "iter", "counter", "core", "proc", "event", "end"
STACK = "stack"  # py-spy samples attributed to a phase (marlwatch.flame, docs/flame.md)
SPAN_SUM, SPAN_HIST, SPAN_ITER = "span_sum", "span_hist", "span_iter"  # aggregates (marlwatch/aggregates.py)
KINDS = (SPAN, ITER, COUNTER, CORE, PROC, EVENT, END, STACK, SPAN_SUM, SPAN_HIST, SPAN_ITER)
AGGREGATE_KINDS = (SPAN_SUM, SPAN_HIST, SPAN_ITER)

KIND_TYPE = pa.dictionary(pa.int8(), pa.string())
NAME_TYPE = pa.dictionary(pa.int32(), pa.string())
SCHEMA = pa.schema(
    [
        pa.field("kind", KIND_TYPE, nullable=False),
        pa.field("proc", pa.int16()),  # process slot: 0 learner, 1..W workers; null for cores
        pa.field("name", NAME_TYPE),  # phase path / counter name / proc metric / event name
        pa.field("parent", NAME_TYPE),  # enclosing phase of a span; null at top level
        pa.field("t_ns", pa.int64(), nullable=False),  # ns since the run started
        pa.field("dur_ns", pa.int64()),  # span duration; span_sum: their total
        pa.field("iter", pa.int64()),  # the process's iteration count at t_ns
        pa.field("core", pa.int16()),  # cpu core of a core sample
        pa.field("value", pa.float64()),  # counter value, core or process cpu %, rss bytes, a count
        pa.field("text", pa.string()),  # event detail (JSON)
        pa.field("bin", pa.int16()),  # span_hist: the histogram bucket
    ]
)
# Format 1, read still: the same columns as plain strings, without `bin`.
SCHEMA_V1 = pa.schema(
    [pa.field(f.name, pa.string(), nullable=f.nullable) if pa.types.is_dictionary(f.type) else f
     for f in SCHEMA if f.name != "bin"]
)
COLUMNS = SCHEMA.names


def kind_codes(batch: pa.RecordBatch) -> tuple[list[str | None], np.ndarray]:
    """The kinds in a batch and, per row, the index of its kind in that list (-1: null).

    `kind` is dictionary-encoded (format 2, and format 1 files as the reader hands them out), so
    this is the dictionary and its indices; a dictionary that names a kind twice (only a crafted
    file has one) is folded so that each kind has one code. The reader's checks and Metrics ask
    about the same batch one after the other: the last answer is kept, with the column, and
    reused while it is asked about the same column (Arrow buffers never change, and the kept
    column keeps them alive, so the same buffer address, offset and length mean the same rows)."""
    col = batch.column("kind")
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    ind = col.indices
    key = (ind.buffers()[1].address if ind.buffers()[1] is not None else 0, ind.offset, len(ind))
    last = _last_kinds[0]  # one tuple, replaced whole: safe from two threads
    if last is not None and last[0] == key:
        return last[2], last[3]
    kinds = col.dictionary.to_pylist()
    codes = (ind.to_numpy(zero_copy_only=False) if ind.null_count == 0
             else pc.fill_null(ind, -1).to_numpy(zero_copy_only=False)).astype(np.int32, copy=False)
    codes = first_codes(kinds, codes)
    _last_kinds[0] = (key, col, kinds, codes)
    return kinds, codes


_last_kinds: list[tuple | None] = [None]


def first_codes(values: list, codes: np.ndarray) -> np.ndarray:
    """`codes` into a dictionary `values`, each value's repeats mapped to its first entry (-1, a
    null, stays -1): a dictionary that names a value twice (only a crafted file has one) then
    gives one code per value, as code-by-code readers assume. `codes` itself when none repeats."""
    if len(set(values)) == len(values):
        return codes
    first: dict = {}
    for i, v in enumerate(values):
        first.setdefault(v, i)
    return np.array([first[v] for v in values] + [-1], codes.dtype)[codes]


def kinds_present(kinds: list[str | None], codes: np.ndarray) -> set[str | None]:
    """The kinds that rows of the batch have (kind_codes' list may name others)."""
    if len(kinds) == 1:
        return set(kinds) if len(codes) and codes.max() == 0 else set()
    counts = np.bincount(codes[codes >= 0], minlength=len(kinds))
    return {k for k, c in zip(kinds, counts.tolist(), strict=True) if c}


def one_batch(batches: list[pa.RecordBatch]) -> pa.RecordBatch | None:
    """The rows of `batches` (one schema) as one record batch, in order: a lone batch as it is;
    None for no batch, or for two or more without a row. Metrics, the writer and the reader's
    checks cost per batch, not per row: feeding them one batch per flush or jump keeps them cheap."""
    if len(batches) <= 1:
        return batches[0] if batches else None
    combined = pa.Table.from_batches(batches).combine_chunks().to_batches()
    return combined[0] if combined else None


class RecordingError(Exception):
    """A recording that cannot be written or read; the message is one line for the user."""


class RecordingExists(RecordingError):
    """The recording's path holds a file already, and overwriting it was not asked for."""


@dataclass
class RunInfo:
    """The run's configuration, stored as JSON in the schema metadata."""

    algo: str
    env: str
    agents: int
    workers: int
    seed: int
    iterations: int | None
    spans: bool = True
    host: str = ""
    cores: int = 0
    start_unix: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    pinning: dict[str, int | None] = field(default_factory=dict)
    procs: dict[str, str] = field(default_factory=dict)  # slot -> role ("learner", "worker 1", ...)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @property
    def launcher(self) -> str:
        """What started the processes: ``builtin`` (an algorithm), ``command`` or ``listen``."""
        kind = self.extra.get("launcher")
        return kind if kind in ("command", "listen") else "builtin"

    def title(self) -> str:
        """One line naming the run, the same in the title bar, `summary` and flame graphs."""
        if self.launcher == "command":
            command = self.extra.get("command")
            if isinstance(command, list) and all(isinstance(a, str) for a in command):
                return shlex.join(command)
            return "a command"
        if self.launcher == "listen":
            return "processes that connected (marlwatch listen)"
        return (f"{self.algo} {self.env} {self.agents} agent{'s' * (self.agents != 1)} "
                f"{self.workers} worker{'s' * (self.workers != 1)}")


@dataclass
class RunEnd:
    """What a recording's ``end`` row says (its `text`, JSON): the facts known only when the run
    ended: the rows written, why it stopped, its failure, and the nodes of a run across machines
    (``node`` details: name, id, host, ip, local, cores, first_core; empty on one machine)."""

    rows: int | None = None
    stop_reason: str | None = None
    failure: str | None = None
    nodes: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: Any) -> RunEnd:
        """The end row's text, checked (a damaged or hand-written one says what it can)."""
        try:
            d = json.loads(text) if isinstance(text, str) else {}
        except ValueError:
            d = {}
        if not isinstance(d, dict):
            d = {}

        def line(key: str) -> str | None:
            v = d.get(key)
            return v[:500] if isinstance(v, str) else None

        rows = d.get("rows")
        return cls(rows if isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0 else None,
                   line("stop_reason"), line("failure"), node_details(d.get("nodes")))

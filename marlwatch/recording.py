"""Recordings: one Arrow IPC stream per run (format in docs/recording-format.md).

The writer buffers rows and writes them at least every `flush_interval_s` (2 s), then flushes
the file, so a run killed with SIGKILL leaves every batch written up to then. Format 2 (the
current one) dictionary-encodes kind/name/parent, writes span rows in batches of their own and,
every group of span batches, their aggregates (marlwatch/aggregates.py) in another, so that the
figures can be read without decompressing the spans. A complete recording ends with a row of
kind ``end``; the reader reports a file without it as truncated, and a file cut mid-batch
yields every complete batch before the cut. Format 1 files are read too (converted as read).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marlwatch import aggregates, ipcscan
from marlwatch.outputs import OutputError, OutputExists, new_file

# The format's names, defined in marlwatch/schema.py; imported from here by most of marlwatch.
from marlwatch.schema import (  # noqa: F401
    AGGREGATE_KINDS,
    AGGREGATES_PART,
    BATCH_COVERS_KEY,
    BATCH_PART_KEY,
    BATCH_SEQ_KEY,
    BATCH_TIME_KEY,
    COLUMNS,
    CORE,
    COUNTER,
    END,
    EVENT,
    FORMAT_KEY,
    FORMAT_VERSION,
    ITER,
    ITERATIONS_PART,
    KIND_TYPE,
    KINDS,
    METADATA_KEY,
    NAME_TYPE,
    PROC,
    ROWS_PART,
    SCHEMA,
    SCHEMA_V1,
    SPAN,
    SPAN_HIST,
    SPAN_ITER,
    SPAN_SUM,
    SPANS_PART,
    STACK,
    RecordingError,
    RecordingExists,
    RunEnd,
    RunInfo,
    kind_codes,
    kinds_present,
    one_batch,
)


def _returning_memory_pool() -> None:
    # pyarrow 26 made mimalloc the default pool, which keeps what a burst of batches took: the
    # monitor grew by 70 MB while a fast producer flooded a slow recorder (tests/test_faults.py),
    # and stayed there. jemalloc (pyarrow's earlier default) and the system allocator give it back.
    # A pool the user chose (ARROW_DEFAULT_MEMORY_POOL) is kept.
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL") or pa.default_memory_pool().backend_name != "mimalloc":
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc
        pa.set_memory_pool(pa.system_memory_pool())


_returning_memory_pool()

_DICTIONARY_COLUMNS = ("kind", "name", "parent")
# The reader hands on small batches together, up to this many rows (summary of 10M spans: 2^14
# and 2^18 rows were both slower).
_COALESCE_ROWS = 1 << 16
# zstd level 9: a third smaller than level 1 on real recordings and 2.5 % smaller than level 6, for
# ~0.4 us more of the monitor's time per row (0.1 % of a core at 2,000 spans/s; docs/benchmarks.md).
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", 9))
_SMALL_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


RUNS_DIR = Path("runs")


def default_record_path(prefix: str, suffix: str = ".arrow") -> Path:
    """The default name of what a run (or a sweep, `suffix=""`) writes: runs/PREFIX-YYYYmmdd-HHMMSS.

    Two runs can start in the same second: whoever creates it takes the next free one of
    `numbered(path)` (the writer's `unique=True`, a sweep's exclusive mkdir)."""
    return RUNS_DIR / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"


def empty_columns() -> dict[str, list]:
    return {name: [] for name in COLUMNS}


def conform(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with SCHEMA's columns and types: format 1's strings dictionary-encoded, `bin` added
    (null) when missing. A batch in SCHEMA already is returned as it is."""
    if batch.schema.equals(SCHEMA, check_metadata=False):
        return batch
    cols = []
    for f in SCHEMA:
        i = batch.schema.get_field_index(f.name)
        if i < 0:
            cols.append(pa.nulls(batch.num_rows, f.type))
            continue
        col = batch.column(i)
        if col.type != f.type:
            if f.name == "kind" and not pa.types.is_dictionary(col.type):
                # int8 codes hold 127 kinds: more is a crafted file; unknown kinds become null,
                # which the reader's checks skip as of an unknown kind all the same.
                col = pc.if_else(pc.is_in(col, pa.array(KINDS)), col, pa.nulls(len(col), col.type))
            col = col.cast(f.type)
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, schema=SCHEMA)


class _Dictionary:
    """One dictionary column's values for the whole file, only ever appended to: every batch's
    indices point into it, and Arrow writes the dictionary again only when it has grown (a whole
    replacement, not a delta: polars reads no deltas)."""

    def __init__(self, type_: pa.DataType) -> None:
        self.type = type_
        self.values: list[str] = []
        self._index: dict[str, int] = {}
        self.array = pa.array([], pa.string())

    def code(self, value: str) -> int:
        j = self._index.get(value)
        if j is None:
            j = self._index[value] = len(self.values)
            self.values.append(value)
            self.array = pa.array(self.values, pa.string())
        return j

    def encode(self, col: pa.Array) -> pa.DictionaryArray:
        """`col` (dictionary-encoded with any dictionary) with indices into this one."""
        local = col.dictionary.to_pylist()
        mapping = np.array([self.code(v) for v in local] + [0], np.int64)
        ind = col.indices
        codes = mapping[ind.to_numpy(zero_copy_only=False) if ind.null_count == 0
                        else pc.fill_null(ind, len(local)).to_numpy(zero_copy_only=False)]
        mask = pc.is_null(ind).to_numpy(zero_copy_only=False) if ind.null_count else None
        return self.indices(codes, mask)

    def indices(self, codes: np.ndarray, mask: np.ndarray | None = None) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(codes, self.type.index_type, mask=mask), self.array)


def _lz4_message(batch: pa.RecordBatch, meta: dict[bytes, bytes]) -> bytes:
    """The IPC message of `batch`, its buffers LZ4-compressed, to go into the recording's stream
    after the dictionaries it uses (docs/recording-format.md, "Codecs")."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=_SMALL_WRITE_OPTIONS) as w:
        w.write_batch(batch, custom_metadata=meta)
    data = sink.getvalue()
    src = pa.BufferReader(data)
    reader = pa.ipc.MessageReader.open_stream(src)
    start = 0
    while reader.read_next_message().type != ipcscan.RECORD_BATCH:  # the schema, the dictionaries
        start = src.tell()
    return data[start:src.tell()].to_pybytes()


def _time_range(t: pa.Array) -> bytes:
    mm = pc.min_max(t)
    return f"{mm['min'].as_py()},{mm['max'].as_py()}".encode()


class _Encoder:
    """Writes a recording's batches (format 2, docs/recording-format.md): span rows in batches of
    their own sorted by (process, start), which compresses their times best; the other rows in
    another; and, once `aggregates.SPANS_PER_GROUP` spans or `aggregates.GROUP_S` seconds have
    gone by (and at the end), the aggregates of the span batches since the last ones. Span
    batches are zstd, the others LZ4 (docs/recording-format.md, "Codecs"). Every
    batch is numbered and says what it holds in its custom metadata. Aggregate rows given to it
    are dropped: the ones it writes are made from the spans it wrote."""

    def __init__(self, f: BinaryIO, schema: pa.Schema) -> None:
        self._file = f
        self._writer = pa.ipc.new_stream(f, schema, options=_WRITE_OPTIONS)
        # How long each dictionary the stream has is (they only ever grow: see _Dictionary).
        self._dicts_written: tuple[int, ...] = ()
        self._dicts = {name: _Dictionary(SCHEMA.field(name).type) for name in _DICTIONARY_COLUMNS}
        self.batches = 0
        self._group: list[tuple[np.ndarray, ...]] = []
        self._group_spans = 0
        self._group_seqs: list[int] = []
        self._group_t = 0
        self._group_started = time.monotonic()

    def write_empty(self) -> None:
        """A batch without rows and without a number: puts the schema on disk (see RecordingWriter)."""
        self._writer.write_batch(pa.RecordBatch.from_pydict(empty_columns(), schema=SCHEMA))

    def _write(self, batch: pa.RecordBatch, part: bytes, extra: dict[bytes, bytes] | None = None) -> None:
        meta = {BATCH_SEQ_KEY: str(self.batches).encode(), BATCH_PART_KEY: part,
                BATCH_TIME_KEY: _time_range(batch.column("t_ns")), **(extra or {})}
        dicts = tuple(len(batch.column(name).dictionary) for name in _DICTIONARY_COLUMNS)
        if part == SPANS_PART:
            self._writer.write_batch(batch, custom_metadata=meta)
        else:
            if dicts != self._dicts_written:
                # The stream's writer puts a dictionary on disk only with a batch that uses it:
                # an empty one, which every reader passes over, brings them up to date.
                self._writer.write_batch(batch.slice(0, 0))
            self._file.write(_lz4_message(batch, meta))
        self._dicts_written = dicts
        self.batches += 1

    def write(self, table: pa.Table, *, final: bool = False) -> None:
        """Write the rows of `table` (SCHEMA) as the batches of one flush; with `final`, close the
        last aggregate group too."""
        if table.num_rows:
            batch = table.combine_chunks().to_batches()[0]
            cols = [self._dicts[f.name].encode(batch.column(f.name)) if f.name in self._dicts else batch.column(f.name)
                    for f in SCHEMA]
            batch = pa.RecordBatch.from_arrays(cols, schema=SCHEMA)
            kinds = self._dicts["kind"]
            codes = batch.column("kind").indices.to_numpy(zero_copy_only=False)
            span = codes == kinds.code(SPAN)
            other = ~span & ~np.isin(codes, [kinds.code(k) for k in AGGREGATE_KINDS])
            if span.any():
                self._spans(batch.filter(pa.array(span)) if not span.all() else batch)
            if self._group_spans and (final or self._group_spans >= aggregates.SPANS_PER_GROUP
                                      or time.monotonic() - self._group_started >= aggregates.GROUP_S):
                self._aggregates()
            if other.any():
                self._write(batch.filter(pa.array(other)) if not other.all() else batch, ROWS_PART)
        elif final and self._group_spans:
            self._aggregates()

    def _spans(self, spans: pa.RecordBatch) -> None:
        proc = pc.fill_null(spans.column("proc"), -1).to_numpy(zero_copy_only=False)
        t = spans.column("t_ns").to_numpy(zero_copy_only=False)
        order = np.lexsort((t, proc))
        spans = spans.take(pa.array(order))
        self._group_seqs.append(self.batches)
        self._write(spans, SPANS_PART)
        ints = [pc.fill_null(c, -1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                for c in (spans.column("proc"), spans.column("name").indices, spans.column("parent").indices,
                          spans.column("iter"), spans.column("dur_ns"))]
        self._group.append(tuple(ints))
        self._group_spans += spans.num_rows
        self._group_t = max(self._group_t, int(t.max()))

    def _aggregates(self) -> None:
        proc, name, parent, it, dur = (np.concatenate(c) for c in zip(*self._group, strict=True))
        ok = (name >= 0) & (dur >= 0)  # a span without a phase or a duration is not one the figures count
        sums, hists, iters = aggregates.fold(proc[ok], name[ok], parent[ok], it[ok], dur[ok])
        covers = {BATCH_COVERS_KEY: f"{self._group_seqs[0]},{self._group_seqs[-1]}".encode()}
        n, m = len(sums["proc"]), len(hists["proc"])
        none, some = np.ones(n + m, bool), np.zeros(n + m, bool)
        batch = self._rows(
            n + m, [(SPAN_SUM, n), (SPAN_HIST, m)],
            proc=np.concatenate([sums["proc"], hists["proc"]]),
            name=np.concatenate([sums["name"], hists["name"]]),
            parent=np.concatenate([sums["parent"], np.full(m, -1)]),
            dur_ns=(np.concatenate([sums["total"], np.zeros(m, np.int64)]), np.concatenate([some[:n], none[:m]])),
            iter=np.concatenate([sums["iter"], np.where(hists["first"], 0, -1)]),
            value=np.concatenate([sums["count"], hists["count"]]).astype(np.float64),
            bin=(np.concatenate([np.zeros(n, np.int64), hists["bin"]]), np.concatenate([none[:n], some[:m]])))
        k = len(iters["name"])
        per_iteration = self._rows(k, [(SPAN_ITER, k)], proc=np.full(k, -1), name=iters["name"],
                                   parent=iters["parent"], dur_ns=(iters["total"], np.zeros(k, bool)),
                                   iter=iters["iter"], value=iters["count"].astype(np.float64))
        self._group, self._group_spans, self._group_seqs = [], 0, []
        self._group_started = time.monotonic()
        if batch.num_rows:
            self._write(batch, AGGREGATES_PART, covers)
        if per_iteration.num_rows:
            self._write(per_iteration, ITERATIONS_PART, covers)

    def _rows(self, n: int, kinds: list[tuple[str, int]], **cols: Any) -> pa.RecordBatch:
        """A batch of aggregate rows: `kinds` as (kind, how many rows) in order; integer columns with
        -1 for null (or (values, null mask)); dictionary columns as codes into the file's
        dictionaries; t_ns the group's latest start."""
        kind = self._dicts["kind"]
        arrays = []
        for f in SCHEMA:
            if f.name == "kind":
                arrays.append(kind.indices(np.repeat([kind.code(k) for k, _ in kinds], [c for _, c in kinds])))
            elif f.name == "t_ns":
                arrays.append(pa.array(np.full(n, self._group_t, np.int64)))
            elif f.name not in cols:
                arrays.append(pa.nulls(n, f.type))
            else:
                values, mask = cols[f.name] if isinstance(cols[f.name], tuple) else (cols[f.name], cols[f.name] < 0)
                if f.name in self._dicts:
                    arrays.append(self._dicts[f.name].indices(np.maximum(values, 0), mask))
                else:
                    arrays.append(pa.array(values, f.type, mask=mask if mask.any() else None))
        return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)

    def close(self) -> None:
        self._writer.close()


class RecordingWriter:
    """Append rows to a recording; a context manager that always leaves a readable file."""

    def __init__(self, path: str | os.PathLike, info: RunInfo, *, flush_interval_s: float = 2.0,
                 overwrite: bool = False, unique: bool = False) -> None:
        """Create the recording at `path`. An existing regular file is refused (RecordingExists)
        unless `overwrite`; with `unique` (a default name) the first free one of `path`, `path-2`,
        ... is taken instead and `self.path` says which. The file appears with the schema in it, and
        only on a free name (outputs.new_file): two runs never share a file, and a monitor killed at
        any moment leaves a readable one. A device or FIFO that exists is written straight through."""
        self.path = Path(path)
        info.format_version = FORMAT_VERSION
        self.info = info
        self.flush_interval_s = flush_interval_s
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordingError(f"cannot write recording {self.path}: {e.strerror or e}") from None
        schema = file_schema(info)
        self._schema = schema
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._last_flush = time.monotonic()
        self.rows_written = 0
        self.closed = False
        self.failed: str | None = None

        def head(f: BinaryIO) -> None:
            self._enc = _Encoder(f, schema)
            # Arrow writes the schema only with the first batch; an empty one puts the schema and
            # the run's metadata in the file before it appears, so a monitor killed at any moment
            # leaves a readable file (0 batches, truncated), never a 0-byte one. Readers skip it.
            self._enc.write_empty()
            f.flush()

        try:
            self._file, self.path = new_file(self.path, head, unique=unique, overwrite=overwrite)
        except OutputExists:
            raise RecordingExists(f"recording {self.path} exists already; not overwritten") from None
        except OutputError as e:
            raise RecordingError(f"cannot write recording {self.path}: {e.reason}") from None
        except (OSError, pa.ArrowException) as e:  # from head(): a full disk, /dev/full
            raise RecordingError(f"cannot write recording {self.path}: {getattr(e, 'strerror', None) or e}") from None

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Queue rows (SCHEMA's columns; format 1's strings are converted); written at the next flush."""
        if isinstance(batch, pa.Table):
            self._pending.extend(conform(b) for b in batch.to_batches())
        else:
            self._pending.append(conform(batch))
        self._pending_rows += batch.num_rows
        if self._pending_rows >= 65536 or time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self, *, final: bool = False) -> None:
        """Write what is queued as the batches of one flush and push them to the disk."""
        self._last_flush = time.monotonic()
        if (not self._pending and not final) or self.closed:
            return
        table = pa.Table.from_batches(self._pending, schema=SCHEMA)
        self._pending, self._pending_rows = [], 0
        try:
            self._enc.write(table, final=final)
            self._file.flush()
        except OSError as e:
            self.failed = f"recording stopped, {self.path}: {e.strerror or e}"
            raise RecordingError(self.failed) from None
        self.rows_written += table.num_rows

    def close(self, *, complete: bool = True, t_ns: int = 0,
              detail: dict[str, Any] | None = None) -> pa.RecordBatch | None:
        """Flush, write the end-of-run marker (when `complete`) and close the stream. Returns the
        marker's row once it is on disk (so a live view can tell the recording is complete), else None."""
        if self.closed:
            return None
        written = None
        try:
            if complete and self.failed is None:
                end = empty_columns()
                for name in COLUMNS:
                    end[name].append(None)
                end["kind"][0], end["t_ns"][0] = END, t_ns
                end["text"][0] = json.dumps({"rows": self.rows_written + self._pending_rows, **(detail or {})})
                marker = pa.RecordBatch.from_pydict(end, schema=SCHEMA)
                self._pending.append(marker)
            if self.failed is None:
                self.flush(final=True)
                self._enc.close()
                if complete and self.failed is None:
                    written = marker
        except (OSError, RecordingError, pa.ArrowException):
            pass  # what was flushed before stays readable; the caller already knows of `failed`
        finally:
            self.closed = True
            try:
                self._file.close()
            except OSError:
                pass
        return written


def file_schema(info: RunInfo) -> pa.Schema:
    """SCHEMA with the run metadata and the format version, as a file written now has it."""
    return SCHEMA.with_metadata({METADATA_KEY: info.to_json(), FORMAT_KEY: str(FORMAT_VERSION)})


@dataclass
class Recording:
    """A recording opened for reading: its run info and a way to stream its batches.

    The reader is the boundary where a file's contents are checked (marlwatch/validate.py):
    every batch it yields holds exactly SCHEMA's columns and types (format 1 files converted)
    and only rows that hold what their kind needs; `skipped` says what it left out (for one
    warning, `warning()`)."""

    path: Path
    info: RunInfo
    schema: pa.Schema
    complete: bool | None = None  # known once the batches were read to the end
    truncated_mid_batch: bool = False
    batches_read: int = 0
    columns: list[int] | None = None  # where SCHEMA's columns are in the file, when it has others too
    # validate.Skipped: what the last pass over the batches left out (rows, batches, metadata
    # entries, and what a Metrics given it left out past its bounds)
    skipped: Any = None
    version: int = FORMAT_VERSION
    # Whether the last pass used aggregates in place of the spans they cover.
    used_aggregates: bool = False
    # What the end row says (stop reason, failure, a run's nodes), once read; None without one.
    end: RunEnd | None = None

    def batches(self, aggregates: bool = False, iterations: bool = False,
                totals: bool = True) -> Iterator[pa.RecordBatch]:
        """Every complete batch in the file, in order, checked; sets `complete` at the end.

        Without `aggregates`: every row but the aggregates (span_sum, span_hist, span_iter), so
        every span is there (for exact figures, export, flame graphs). With `aggregates`: the
        span_sum and span_hist rows and every row but the spans they cover, whose batches are
        not even decompressed; spans no aggregate covers (a file cut before its last aggregates,
        or format 1) are there too. With `iterations` as well, the span_iter rows (diff's
        per-iteration table) of the same groups, and without `totals` not their span_sum and
        span_hist rows (diff's figures all come from span_iter). Small batches are handed on
        together (up to 65,536 rows, in file order), as the figures are made the faster. Raises RecordingError when the file holds rows
        but none of them is valid."""
        from marlwatch.validate import BatchChecker

        self.skipped.reset()
        checker = BatchChecker(self.skipped)
        self.complete, self.end = False, None
        self.truncated_mid_batch = False
        self.batches_read = 0
        self.used_aggregates = False
        rows = 0
        pending: list[pa.RecordBatch] = []
        with ipcscan.Stream(self.path) as stream:
            listing = stream.listing()
            plan = self._plan(listing, aggregates, iterations, totals)
            batches = ipcscan.batches(stream.reader(listing.messages, [m for m, keep in plan if keep]))
            for m, keep in plan:
                if not keep:
                    checker.passed(m.custom)  # its number still counts in the batch order
                    continue
                try:
                    batch, custom = next(batches)
                    # The IPC reader checks framing, not contents: a damaged batch (a flipped bit
                    # in an offset buffer) reads "fine" and then crashes Arrow compute kernels with
                    # a segfault. Full validation makes it a damaged batch, like a cut one.
                    batch.validate(full=True)
                except (StopIteration, pa.ArrowInvalid, pa.ArrowException, OSError, ValueError):
                    self.truncated_mid_batch = True
                    if m.custom.get(BATCH_PART_KEY) == AGGREGATES_PART:
                        # The spans it stood for were passed over: read them after all.
                        yield from self._coalesced(pending, checker)
                        pending = []
                        yield from self._recover(stream, listing, plan, m, checker)
                    break
                if batch.num_rows == 0:
                    continue  # the writer's first batch, which only puts the schema on disk
                self.batches_read += 1
                rows += batch.num_rows
                batch = self._ours(batch)
                if checker.repeated(batch, custom):
                    continue
                if m.custom.get(BATCH_PART_KEY) in (None, ROWS_PART):  # where an end row can be
                    end = _end_of(batch)
                    if end is not None:
                        self.complete, self.end = True, end
                if m.custom.get(BATCH_PART_KEY) in (AGGREGATES_PART, ITERATIONS_PART):
                    self.used_aggregates = True
                # Small batches (a flush's other rows, a group's aggregates) are checked and
                # handed on together: the per-batch cost of the checks and of Metrics is most of
                # reading them.
                pending.append(batch)
                if not aggregates or sum(b.num_rows for b in pending) >= _COALESCE_ROWS:
                    yield from self._coalesced(pending, checker)
                    pending = []
            else:
                if listing.cut:
                    self.truncated_mid_batch = True
            yield from self._coalesced(pending, checker)
        if rows and not checker.valid_rows:
            raise RecordingError(f"{self.path}: nothing valid to read: {checker.skipped.describe()}")

    @staticmethod
    def _coalesced(pending: list[pa.RecordBatch], checker: Any) -> Iterator[pa.RecordBatch]:
        batch = one_batch(pending)
        if batch is None:
            return
        checked = checker.rows(batch)
        if checked.num_rows:
            yield checked

    def _plan(self, listing: ipcscan.Listing, aggregates: bool, iterations: bool, totals: bool = True
              ) -> list[tuple[ipcscan.Message, bool]]:
        """Each record batch of the file and whether it is to be read (see `batches`)."""
        record = [m for m in listing.messages if m.type == ipcscan.RECORD_BATCH]
        if self.version < 2:
            return [(m, True) for m in record]
        # A group of span batches is read as aggregates when its aggregate batch (and, for
        # `iterations`, its per-iteration batch too) is in the file; else as spans.
        groups = {part: {_covers(m) for m in record if m.custom.get(BATCH_PART_KEY) == part} - {None}
                  for part in (AGGREGATES_PART, ITERATIONS_PART)}
        usable = groups[AGGREGATES_PART] if aggregates else set()
        if iterations:
            usable = usable & groups[ITERATIONS_PART]
        covered = {seq for a, b in usable for seq in range(a, b + 1)}
        plan = []
        for m in record:
            part = m.custom.get(BATCH_PART_KEY)
            if part == AGGREGATES_PART:
                keep = totals and _covers(m) in usable
            elif part == ITERATIONS_PART:
                keep = iterations and _covers(m) in usable
            elif part == SPANS_PART:
                keep = _seq(m) not in covered
            else:
                keep = True
            plan.append((m, keep))
        return plan

    def _recover(self, stream: ipcscan.Stream, listing: ipcscan.Listing, plan: list, failed: ipcscan.Message,
                 checker: Any) -> Iterator[pa.RecordBatch]:
        rng = _covers(failed)
        lost = [m for m, keep in plan if not keep and rng is not None and rng[0] <= (_seq(m) or -1) <= rng[1]
                and m.custom.get(BATCH_PART_KEY) == SPANS_PART]
        if not lost:
            return
        try:
            for batch, custom in ipcscan.batches(stream.reader(listing.messages, lost)):
                batch.validate(full=True)
                checked = checker.check(self._ours(batch), custom, sequence=False)
                if checked is not None and checked.num_rows:
                    self.batches_read += 1
                    yield checked
        except (pa.ArrowException, OSError, ValueError):
            return

    def parts(self) -> list[Part] | None:
        """Each record batch of a format 2 file, from the message headers alone (nothing is
        decompressed): what it holds, its time range and rows; repeated batch numbers left out
        (and counted in `skipped`). None when some batch does not say (format 1, a file written
        by other means): then only reading the batches tells. Also sets `truncated_mid_batch`,
        and `complete` from the last batch of rows (the only one decoded)."""
        from marlwatch.validate import BatchChecker

        if self.version < 2:
            return None
        with ipcscan.Stream(self.path) as stream:
            listing = stream.listing()
        self.skipped.reset()
        checker = BatchChecker(self.skipped)
        out: list[Part] = []
        for m in listing.messages:
            if m.type != ipcscan.RECORD_BATCH or m.rows == 0:
                continue
            part, seq, span = m.custom.get(BATCH_PART_KEY), _seq(m), _time_span(m)
            if part not in (SPANS_PART, AGGREGATES_PART, ITERATIONS_PART, ROWS_PART) or seq is None or span is None \
                    or m.rows is None:
                return None
            if out and seq <= out[-1].seq:  # a repeat: duplicated or moved
                self.skipped.batches_repeated += 1
                continue
            checker.passed(m.custom)
            out.append(Part(m, seq, part, span[0], span[1], m.rows, _covers(m)))
        self._listing = listing
        self._skipped_batches = (self.skipped.batches_repeated, self.skipped.batches_missing)
        self.truncated_mid_batch = listing.cut
        self.batches_read = len(out)
        last = [p for p in out if p.part == ROWS_PART][-1:]
        self.complete = False
        for batch in self.read(last):
            self.end = _end_of(batch)
            self.complete = self.end is not None
        return out

    def read(self, parts: list[Part]) -> Iterator[pa.RecordBatch]:
        """The checked rows of each of `parts` (from `parts()`; one batch each, maybe without rows),
        in file order; stops at a damaged batch."""
        from marlwatch.validate import BatchChecker

        if not parts:
            return
        checker = BatchChecker(self.skipped)
        with ipcscan.Stream(self.path) as stream:
            reader = stream.reader(self._listing.messages, [p.message for p in sorted(parts, key=lambda p: p.seq)])
            pending: list[pa.RecordBatch] = []
            for batch, _custom in ipcscan.batches(reader):
                try:
                    batch.validate(full=True)
                except (pa.ArrowException, ValueError):
                    break
                pending.append(self._ours(batch))
                if sum(b.num_rows for b in pending) >= _COALESCE_ROWS:
                    yield from self._checked_each(pending, checker)
                    pending = []
            yield from self._checked_each(pending, checker)

    @staticmethod
    def _checked_each(batches: list[pa.RecordBatch], checker: Any) -> Iterator[pa.RecordBatch]:
        """Each batch's valid rows (one batch each, maybe empty), checked all at once."""
        combined = one_batch(batches)
        if combined is None:  # no batch, or none with a row
            yield from batches
            return
        ok = checker.valid(combined)
        start = 0
        for b in batches:
            mine = ok[start: start + b.num_rows]
            start += b.num_rows
            yield b if mine.all() else b.filter(pa.array(mine))

    def reset_skipped(self) -> None:
        """Forget what the rows read so far skipped; keep what the batch numbers said (parts())."""
        self.skipped.reset()
        self.skipped.batches_repeated, self.skipped.batches_missing = getattr(self, "_skipped_batches", (0, 0))

    def _ours(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch with SCHEMA's columns and types."""
        if self.columns is not None:
            batch = batch.select(self.columns)
        return conform(batch)

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches(list(self.batches()), schema=self.schema)

    def warning(self) -> str | None:
        """One line on what the last pass over the batches left out, or None when nothing."""
        return f"{self.path}: {self.skipped.describe()}" if self.skipped else None

    @property
    def status(self) -> str:
        if self.complete is None:
            return "unknown"
        if self.complete:
            return "complete"
        return "truncated mid-batch" if self.truncated_mid_batch else "truncated"


def _end_of(batch: pa.RecordBatch) -> RunEnd | None:
    """What the end row says, when the batch's last row is one (where the writer puts it)."""
    kinds, codes = kind_codes(batch)
    if not len(codes) or codes[-1] < 0 or kinds[codes[-1]] != END:
        return None
    return RunEnd.parse(batch.column("text")[-1].as_py())


@dataclass
class Part:
    """One record batch of a format 2 file, as its header describes it."""

    message: ipcscan.Message
    seq: int
    part: bytes  # SPANS_PART, AGGREGATES_PART or ROWS_PART
    first_ns: int
    last_ns: int
    rows: int
    covers: tuple[int, int] | None  # aggregates: the span batches they stand for


def _time_span(m: ipcscan.Message) -> tuple[int, int] | None:
    first, _, last = (m.custom.get(BATCH_TIME_KEY) or b"").partition(b",")
    try:
        a, b = int(first), int(last)
    except ValueError:
        return None
    return (a, b) if a <= b and abs(a) < 1 << 62 and abs(b) < 1 << 62 else None


def _seq(m: ipcscan.Message) -> int | None:
    raw = m.custom.get(BATCH_SEQ_KEY)
    return int(raw) if raw is not None and raw.isdigit() and len(raw) < 19 else None


def _covers(m: ipcscan.Message) -> tuple[int, int] | None:
    """The span batch numbers an aggregate batch covers (first, last), or None."""
    if m.custom.get(BATCH_PART_KEY) not in (AGGREGATES_PART, ITERATIONS_PART):
        return None
    first, _, last = (m.custom.get(BATCH_COVERS_KEY) or b"").partition(b",")
    if not (first.isdigit() and last.isdigit() and len(first) < 19 and len(last) < 19):
        return None
    a, b = int(first), int(last)
    seq = _seq(m)
    # Aggregates cover span batches written before them, at most a group's worth: a range that
    # is not (a crafted file) covers nothing, and its spans are read.
    if a > b or (seq is not None and b >= seq) or b - a > 1 << 16:
        return None
    return a, b


_CONTINUATION = b"\xff\xff\xff\xff"  # how every message of an Arrow IPC stream begins


def _schema_cut_at(p: Path, size: int) -> int | None:
    """When the file is the start of an Arrow IPC stream cut inside its first message (the
    schema), the length that message needed; else None."""
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if not head or not _CONTINUATION.startswith(head[:4]):
        return None
    if len(head) < 8:
        return 8  # not even the message's length survived
    needed = 8 + int.from_bytes(head[4:], "little", signed=True)
    return needed if needed > size else None


def open_recording(path: str | os.PathLike) -> Recording:
    """Open a recording, checking it is one; raises RecordingError with a one-line reason."""
    p = Path(path)
    # One stat, every failure a line: Path.exists() raises, not returns False, for a file in a
    # directory the user may not enter.
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise RecordingError(f"{p}: no such file") from None
    except OSError as e:
        raise RecordingError(f"{p}: {e.strerror}") from None
    if S_ISDIR(st.st_mode):
        raise RecordingError(f"{p}: is a directory, not a recording")
    size = st.st_size
    if size == 0:
        raise RecordingError(f"{p}: empty file, not a marlwatch recording")
    try:
        f = open(p, "rb")  # noqa: SIM115 (closed by the `with` below)
    except OSError as e:  # a file the user may not read
        raise RecordingError(f"{p}: {e.strerror}") from None
    try:
        with f:
            schema = pa.ipc.open_stream(f).schema
    except (pa.ArrowException, OSError, ValueError):
        needed = _schema_cut_at(p, size)
        if needed is not None:
            raise RecordingError(f"{p}: truncated: an Arrow IPC stream cut inside its schema ({size} of "
                                 f"{needed} bytes), before its first batch; nothing to read") from None
        raise RecordingError(f"{p}: not an Arrow IPC stream (is it a marlwatch recording?)") from None
    meta = schema.metadata or {}
    if METADATA_KEY not in meta:
        raise RecordingError(f"{p}: an Arrow stream, but not a marlwatch recording (no run metadata)")
    version = format_version(meta.get(FORMAT_KEY))
    if version is None:
        raise RecordingError(f"{p}: a marlwatch recording with a damaged format version "
                             f"({meta[FORMAT_KEY][:20]!r})")
    if version > FORMAT_VERSION:
        raise RecordingError(f"{p}: recording format {version} is newer than this marlwatch reads "
                             f"(formats 1 to {FORMAT_VERSION}); read it with a newer marlwatch")
    expected = SCHEMA_V1 if version == 1 else SCHEMA
    where = _our_columns(schema, expected)
    if where is None:
        raise RecordingError(f"{p}: a marlwatch recording with unexpected columns")
    from marlwatch.validate import Skipped, read_info

    try:
        info, dropped = read_info(meta[METADATA_KEY])
    except (ValueError, TypeError) as e:
        raise RecordingError(f"{p}: run metadata is damaged ({e})") from None
    ours = SCHEMA.with_metadata({METADATA_KEY: meta[METADATA_KEY]})
    exact = schema.remove_metadata().equals(expected)  # else batches are rebuilt with SCHEMA's columns
    return Recording(p, info, ours, columns=None if exact else where, skipped=Skipped(metadata=dropped),
                     version=version)


def format_version(raw: bytes | None) -> int | None:
    """A file's format version from its schema metadata (absent: 1), or None when unreadable."""
    if raw is None:
        return 1
    text = raw.strip()
    return int(text) if text.isdigit() and 0 < len(text) < 10 and int(text) >= 1 else None


def _our_columns(schema: pa.Schema, expected: pa.Schema = SCHEMA) -> list[int] | None:
    """Where each of SCHEMA's columns is in a file's schema, or None when one is missing, has
    another type or appears twice. Columns of other names are left alone (even one whose name
    is not UTF-8, which pyarrow cannot turn into a str)."""
    where: dict[str, list[int]] = {}
    for i in range(len(schema)):
        try:
            name = schema.field(i).name
        except UnicodeDecodeError:
            continue
        where.setdefault(name, []).append(i)
    out = []
    for f in expected:
        found = where.get(f.name, [])
        if len(found) != 1 or schema.field(found[0]).type != f.type:
            return None
        out.append(found[0])
    return out

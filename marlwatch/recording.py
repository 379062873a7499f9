"""Recordings: one Arrow IPC stream per run (format in docs/recording-format.md).

The writer buffers rows and writes a record batch at least every `flush_interval_s`, then
flushes the file, so a run killed with SIGKILL leaves every batch written up to then. A
complete recording ends with a row of kind ``end``; the reader reports a file without it as
truncated, and a file cut mid-batch yields every complete batch before the cut.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.outputs import OutputError, OutputExists, new_file

METADATA_KEY = b"marlwatch.run"
FORMAT_VERSION = 1
# Each record batch carries its number in the file (0, 1, ...) in its own custom metadata, so a
# reader can tell a batch repeated or moved (a file spliced by hand or by a broken copy) from
# new rows. Files written before it have none; readers fall back to the iteration order.
BATCH_SEQ_KEY = b"marlwatch.seq"

# Row kinds. One schema for all of them keeps the file a single stream any Arrow reader opens.
SPAN, ITER, COUNTER, CORE, PROC, EVENT, END = "span", "iter", "counter", "core", "proc", "event", "end"
STACK = "stack"  # py-spy samples attributed to a phase (marlwatch.flame, docs/flame.md)

SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),
        pa.field("proc", pa.int16()),  # process slot: 0 learner, 1..W workers; null for cores
        pa.field("name", pa.string()),  # phase path / counter name / proc metric / event name
        pa.field("parent", pa.string()),  # enclosing phase of a span; null at top level
        pa.field("t_ns", pa.int64(), nullable=False),  # ns since the run started
        pa.field("dur_ns", pa.int64()),  # span duration
        pa.field("iter", pa.int64()),  # the process's iteration count at t_ns
        pa.field("core", pa.int16()),  # cpu core of a core sample
        pa.field("value", pa.float64()),  # counter value, core or process cpu %, rss bytes
        pa.field("text", pa.string()),  # event detail (JSON)
    ]
)
COLUMNS = SCHEMA.names
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def kind_codes(batch: pa.RecordBatch) -> tuple[list[str | None], np.ndarray]:
    """The kinds in a batch and, per row, the index of its kind in that list (-1: null).

    Hashing the `kind` strings is a good part of reading a file, and the reader's checks and
    Metrics both need it for the same batch, one after the other: the last answer is kept, with
    the column itself, and reused while it is asked about the same column. Arrow buffers never
    change, and the kept column keeps its buffers alive, so the same buffer address, offset and
    length mean the same rows."""
    col = batch.column("kind")
    key = (col.buffers()[1].address if col.buffers()[1] is not None else 0, col.offset, len(col))
    last = _last_kinds[0]  # one tuple, replaced whole: safe from two threads
    if last is not None and last[0] == key:
        return last[2], last[3]
    enc = pc.dictionary_encode(col)
    kinds = enc.dictionary.to_pylist()
    codes = (np.zeros(len(col), np.int32) if len(kinds) == 1 and enc.indices.null_count == 0
             else pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False))
    _last_kinds[0] = (key, col, kinds, codes)
    return kinds, codes


_last_kinds: list[tuple | None] = [None]


class RecordingError(Exception):
    """A recording that cannot be written or read; the message is one line for the user."""


class RecordingExists(RecordingError):
    """The recording's path holds a file already, and overwriting it was not asked for."""


RUNS_DIR = Path("runs")


def default_record_path(prefix: str, suffix: str = ".arrow") -> Path:
    """The default name of what a run (or a sweep, `suffix=""`) writes: runs/PREFIX-YYYYmmdd-HHMMSS.

    Two runs can start in the same second: whoever creates it takes the next free one of
    `numbered(path)` (the writer's `unique=True`, a sweep's exclusive mkdir)."""
    return RUNS_DIR / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"


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

    @classmethod
    def from_json(cls, text: str | bytes) -> RunInfo:
        """The run info of a file's metadata, checked (ValueError when it is not usable)."""
        from marlwatch.validate import read_info

        return read_info(text)[0]


def empty_columns() -> dict[str, list]:
    return {name: [] for name in COLUMNS}


class RecordingWriter:
    """Append rows to a recording; a context manager that always leaves a readable file."""

    def __init__(self, path: str | os.PathLike, info: RunInfo, *, flush_interval_s: float = 0.5,
                 overwrite: bool = False, unique: bool = False) -> None:
        """Create the recording at `path`. An existing regular file is refused (RecordingExists)
        unless `overwrite`; with `unique` (a default name) the first free one of `path`, `path-2`,
        ... is taken instead and `self.path` says which. The file appears with the schema in it, and
        only on a free name (outputs.new_file): two runs never share a file, and a monitor killed at
        any moment leaves a readable one. A device or FIFO that exists is written straight through."""
        self.path = Path(path)
        self.info = info
        self.flush_interval_s = flush_interval_s
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordingError(f"cannot write recording {self.path}: {e.strerror or e}") from None
        schema = SCHEMA.with_metadata({METADATA_KEY: info.to_json()})
        self._schema = schema
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._last_flush = time.monotonic()
        self.rows_written = 0
        self.batches_written = 0
        self.closed = False
        self.failed: str | None = None

        def head(f: BinaryIO) -> None:
            self._writer = pa.ipc.new_stream(f, schema, options=_WRITE_OPTIONS)
            # Arrow writes the schema only with the first batch; an empty one puts the schema and
            # the run's metadata in the file before it appears, so a monitor killed at any moment
            # leaves a readable file (0 batches, truncated), never a 0-byte one. Readers skip it.
            self._writer.write_batch(pa.RecordBatch.from_pydict(empty_columns(), schema=SCHEMA))
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
        """Queue rows (in SCHEMA's column order); written at the next flush."""
        if isinstance(batch, pa.Table):
            self._pending.extend(batch.to_batches())
        else:
            self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= 65536 or time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def append_rows(self, columns: dict[str, list]) -> None:
        self.append(pa.RecordBatch.from_pydict(columns, schema=SCHEMA))

    def flush(self) -> None:
        """Write what is queued as one record batch and push it to the disk."""
        self._last_flush = time.monotonic()
        if not self._pending or self.closed:
            return
        table = pa.Table.from_batches(self._pending, schema=SCHEMA).combine_chunks()
        self._pending, self._pending_rows = [], 0
        try:
            for b in table.to_batches():
                self._writer.write_batch(b, custom_metadata={BATCH_SEQ_KEY: str(self.batches_written)})
                self.batches_written += 1
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
                self.flush()
                self._writer.close()
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


@dataclass
class Recording:
    """A recording opened for reading: its run info and a way to stream its batches.

    The reader is the boundary where a file's contents are checked (marlwatch/validate.py):
    every batch it yields holds exactly SCHEMA's columns and only rows that hold what their kind
    needs; `skipped` says what it left out (for one warning, `warning()`)."""

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

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Every complete batch in the file, in order, checked; sets `complete` at the end.
        Raises RecordingError when the file holds rows but none of them is valid."""
        from marlwatch.validate import BatchChecker

        self.skipped.reset()
        checker = BatchChecker(self.skipped)
        self.complete = False
        self.truncated_mid_batch = False
        self.batches_read = 0
        rows = 0
        with open(self.path, "rb") as f:
            reader = pa.ipc.open_stream(f)
            while True:
                try:
                    batch, custom = reader.read_next_batch_with_custom_metadata()
                    # The IPC reader checks framing, not contents: a damaged batch (a flipped bit
                    # in an offset buffer) reads "fine" and then crashes Arrow compute kernels with
                    # a segfault. Full validation makes it a damaged batch, like a cut one.
                    batch.validate(full=True)
                except StopIteration:
                    break
                except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError):
                    self.truncated_mid_batch = True
                    break
                if batch.num_rows == 0:
                    continue  # the writer's first batch, which only puts the schema on disk
                self.batches_read += 1
                rows += batch.num_rows
                if self.columns is not None:
                    batch = pa.RecordBatch.from_arrays(batch.select(self.columns).columns, schema=self.schema)
                checked = checker.check(batch, custom)
                if checked is None:
                    continue
                if batch.column("kind")[batch.num_rows - 1].as_py() == END:
                    self.complete = True
                if checked.num_rows:
                    yield checked
        if rows and not checker.valid_rows:
            raise RecordingError(f"{self.path}: nothing valid to read: {checker.skipped.describe()}")

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
    if not p.exists():
        raise RecordingError(f"{p}: no such file")
    if p.is_dir():
        raise RecordingError(f"{p}: is a directory, not a recording")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise RecordingError(f"{p}: {e.strerror}") from None
    if size == 0:
        raise RecordingError(f"{p}: empty file, not a marlwatch recording")
    try:
        with open(p, "rb") as f:
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
    where = _our_columns(schema)
    if where is None:
        raise RecordingError(f"{p}: a marlwatch recording with unexpected columns")
    from marlwatch.validate import Skipped, read_info

    try:
        info, dropped = read_info(meta[METADATA_KEY])
    except (ValueError, TypeError) as e:
        raise RecordingError(f"{p}: run metadata is damaged ({e})") from None
    ours = SCHEMA.with_metadata({METADATA_KEY: meta[METADATA_KEY]})
    exact = schema.remove_metadata().equals(SCHEMA)  # else batches are rebuilt with SCHEMA's columns
    return Recording(p, info, ours, columns=None if exact else where, skipped=Skipped(metadata=dropped))


def _our_columns(schema: pa.Schema) -> list[int] | None:
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
    for f in SCHEMA:
        found = where.get(f.name, [])
        if len(found) != 1 or schema.field(found[0]).type != f.type:
            return None
        out.append(found[0])
    return out

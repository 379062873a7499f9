"""An Arrow IPC stream's messages, listed without decoding them, and a subset read back.

A recording's span batches are most of its bytes; the figures mostly need the small batches
around them (aggregates, iterations, samples). Arrow decompresses a whole record batch to read
any of it, so the reader lists the stream's messages first, from their headers only (the body
of a memory-mapped file is never touched), and then decodes only the messages it needs by
serving their bytes, in file order and behind the schema and every dictionary message before
them, to an ordinary `pyarrow.ipc` stream reader. Which batch is what comes from its custom
metadata (docs/recording-format.md, "Batches"), read here from the message header (a
FlatBuffer: Arrow's `Message.fbs`, fields `header` and `custom_metadata`) with every offset
bounds-checked: a header this parser cannot read is reported as having no metadata, and the
batch is then decoded and checked like any other.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

SCHEMA_MSG, DICTIONARY, RECORD_BATCH = "schema", "dictionary", "record batch"


_INTS = {(size, signed): struct.Struct("<" + (code.lower() if signed else code))
         for size, code in ((2, "H"), (4, "I"), (8, "Q")) for signed in (False, True)}


class _FlatBuffer:
    """Just enough FlatBuffer reading for a Message header; IndexError on anything out of bounds."""

    def __init__(self, data: bytes) -> None:
        self.b = data

    def _int(self, pos: int, size: int, signed: bool = False) -> int:
        if pos < 0 or pos + size > len(self.b):
            raise IndexError(pos)
        # struct reads in place (no slice): the listing reads ~50 of these per message.
        return _INTS[size, signed].unpack_from(self.b, pos)[0]

    def root(self) -> int:
        return self._int(0, 4)

    def field(self, table: int, i: int) -> int:
        """Position of field `i` of the table at `table`, or 0 when absent."""
        vtable = table - self._int(table, 4, signed=True)
        size = self._int(vtable, 2)
        slot = 4 + 2 * i
        if slot + 2 > size:
            return 0
        off = self._int(vtable + slot, 2)
        return table + off if off else 0

    def ref(self, pos: int) -> int:
        return pos + self._int(pos, 4)

    def string(self, pos: int) -> bytes:
        at = self.ref(pos)
        n = self._int(at, 4)
        if at + 4 + n > len(self.b):
            raise IndexError(at)
        return self.b[at + 4: at + 4 + n]

    def vector(self, pos: int) -> list[int]:
        at = self.ref(pos)
        n = self._int(at, 4)
        if n > len(self.b) // 4:
            raise IndexError(at)
        return [at + 4 + 4 * k for k in range(n)]


def header_facts(metadata: bytes) -> tuple[dict[bytes, bytes], int | None]:
    """A record batch message's custom metadata and row count, read from its header; ({}, None)
    when the header cannot be read."""
    fb = _FlatBuffer(metadata)
    try:
        msg = fb.root()
        custom: dict[bytes, bytes] = {}
        at = fb.field(msg, 4)  # Message.custom_metadata: [KeyValue]
        if at:
            for kv_pos in fb.vector(at):
                kv = fb.ref(kv_pos)
                k, v = fb.field(kv, 0), fb.field(kv, 1)
                if k and v:
                    custom[fb.string(k)] = fb.string(v)
        rows = None
        at = fb.field(msg, 2)  # Message.header: a RecordBatch table, whose field 0 is `length`
        if at:
            length = fb.field(fb.ref(at), 0)
            rows = fb._int(length, 8, signed=True) if length else 0
        return custom, rows
    except (IndexError, ValueError):
        return {}, None


@dataclass
class Message:
    """One message of the stream: where its bytes are, and for a record batch what its header says."""

    type: str
    start: int
    end: int
    custom: dict[bytes, bytes] = field(default_factory=dict)
    rows: int | None = None


@dataclass
class Listing:
    """Every whole message of a stream, in order; `cut` when the stream ends inside one."""

    messages: list[Message]
    cut: bool


class Stream:
    """A recording's bytes, memory-mapped (the pages a reader never decodes are never read)."""

    def __init__(self, path: str | os.PathLike) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.size = size

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # an Arrow buffer still views it: it is unmapped once that goes
                pass
            self._map = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def listing(self) -> Listing:
        """Every message's type and position (record batches: custom metadata and rows)."""
        out: list[Message] = []
        if self._map is None:
            return Listing(out, False)
        src = pa.BufferReader(pa.py_buffer(self._map))
        reader = pa.ipc.MessageReader.open_stream(src)
        start = 0
        cut = False
        while True:
            try:
                m = reader.read_next_message()
            except StopIteration:
                break
            except (pa.ArrowException, OSError, ValueError):
                cut = True
                break
            end = src.tell()
            msg = Message(m.type, start, end)
            if m.type == RECORD_BATCH:
                msg.custom, msg.rows = header_facts(m.metadata.to_pybytes())
            out.append(msg)
            start = end
        return Listing(out, cut)

    def reader(self, messages: list[Message], keep: list[Message]) -> pa.ipc.RecordBatchStreamReader:
        """An Arrow stream reader of the record batches `keep` (in order, a subset of `messages`),
        behind the schema and every dictionary message that comes before them in the file."""
        last = keep[-1].start if keep else -1
        wanted = {id(m) for m in keep}
        ranges: list[tuple[int, int]] = []
        for m in messages:
            if m.type == SCHEMA_MSG or (m.type == DICTIONARY and m.start < last) or id(m) in wanted:
                if ranges and ranges[-1][1] == m.start:  # adjacent messages: one range
                    ranges[-1] = (ranges[-1][0], m.end)
                else:
                    ranges.append((m.start, m.end))
        if self._map is not None and sum(b - a for a, b in ranges) <= _JOIN_BYTES:
            # The small batches around the spans (aggregates, iterations, samples): copied into
            # one buffer and decoded on this thread. Arrow decompresses each column buffer with
            # a new zstd context, so a batch of a few hundred rows costs ~0.3 ms whatever its
            # size; reading them through a Python file object and the thread pool added ~40 %.
            joined = pa.py_buffer(b"".join(self._map[a:b] for a, b in ranges))
            return pa.ipc.open_stream(joined, options=_SMALL_READS)
        return pa.ipc.open_stream(_Ranges(self._map, ranges))


# Up to this many bytes of messages are read from one joined copy (above it: span batches, which
# Arrow decompresses faster on its threads, read straight from the map).
_JOIN_BYTES = 32 << 20
_SMALL_READS = pa.ipc.IpcReadOptions(use_threads=False)


class _Ranges(io.RawIOBase):
    """A read-only file made of byte ranges of a memory map, one after the other."""

    def __init__(self, data: mmap.mmap | None, ranges: list[tuple[int, int]]) -> None:
        self._data = data if data is not None else b""
        self._ranges = iter(ranges)
        self._pos, self._end = 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        while self._pos >= self._end:
            nxt = next(self._ranges, None)
            if nxt is None:
                return 0
            self._pos, self._end = nxt
        n = min(len(buf), self._end - self._pos)
        buf[:n] = self._data[self._pos: self._pos + n]
        self._pos += n
        return n


def batches(reader: pa.ipc.RecordBatchStreamReader) -> Iterator[tuple[pa.RecordBatch, pa.KeyValueMetadata | None]]:
    """(batch, custom metadata) from a stream reader until its end; Arrow errors propagate."""
    while True:
        try:
            yield reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            return

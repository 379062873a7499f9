"""An Arrow IPC stream's messages, listed without decoding them, and a subset read back.

A recording's span batches are most of its bytes; the figures mostly need the small batches
around them (aggregates, iterations, samples). Arrow decompresses a whole record batch to read
any of it, so the reader lists the stream's messages first, from their headers only (a body is
never read), and then decodes only the messages it needs by serving their bytes, in file order
and behind the schema and every dictionary message before them, to an ordinary `pyarrow.ipc`
stream reader. The bytes are read with `pread`, not through a memory map: a file that another
process cuts short while it is read then reads short (a cut stream, reported as such) instead of
killing the reader with SIGBUS. Which batch is what comes from its custom
metadata (docs/recording-format.md, "Batches"), read here from the message header (a
FlatBuffer: Arrow's `Message.fbs`, fields `header` and `custom_metadata`) with every offset
bounds-checked: a header this parser cannot read is reported as having no metadata, and the
batch is then decoded and checked like any other.
"""

from __future__ import annotations

import io
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


# Message.fbs: the Message table's fields, and the values of its `header_type` union.
_MESSAGE_HEADER_TYPE, _MESSAGE_BODY_LENGTH = 1, 3
_HEADER_TYPES = {1: SCHEMA_MSG, 2: DICTIONARY, 3: RECORD_BATCH}
_CONTINUATION = 0xFFFFFFFF


def _message_facts(metadata: bytes) -> tuple[str, int] | None:
    """A message's type and body length from its header; None when the header cannot be read."""
    fb = _FlatBuffer(metadata)
    try:
        msg = fb.root()
        at = fb.field(msg, _MESSAGE_HEADER_TYPE)
        kind = metadata[at] if at else 0
        at = fb.field(msg, _MESSAGE_BODY_LENGTH)
        body = fb._int(at, 8, signed=True) if at else 0
    except (IndexError, ValueError):
        return None
    return _HEADER_TYPES.get(kind, "other"), body


class Stream:
    """A recording's bytes, read where needed (a body the reader never decodes is never read)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def pread(self, start: int, end: int) -> bytes:
        """The bytes from `start` to `end`; fewer when the file is shorter now."""
        assert self._fd is not None, "the stream is closed"
        parts, pos = [], start
        while pos < end:
            chunk = os.pread(self._fd, min(end - pos, 1 << 30), pos)
            if not chunk:
                break
            parts.append(chunk)
            pos += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def listing(self) -> Listing:
        """Every message's type and position (record batches: custom metadata and rows), walking
        the stream's framing (Arrow's IPC format: a continuation marker, the header's length, the
        header, the body) from header to header."""
        out: list[Message] = []
        start = 0
        while True:
            # The framing and, most often, the whole header in one read (a header is ~1 KB).
            prefix = self.pread(start, start + _HEADER_READ)
            if len(prefix) < 4:
                return Listing(out, cut=bool(prefix))  # the end of the file (cut inside a marker)
            first = int.from_bytes(prefix[:4], "little")
            if first == _CONTINUATION:
                if len(prefix) < 8:
                    return Listing(out, cut=True)
                length, header_at = int.from_bytes(prefix[4:8], "little", signed=True), start + 8
            else:  # the framing before Arrow 0.15: the length alone
                length, header_at = int.from_bytes(prefix[:4], "little", signed=True), start + 4
            if length == 0:
                return Listing(out, cut=False)  # the end-of-stream marker
            if length < 0 or header_at + length > self.size:
                return Listing(out, cut=True)
            header = prefix[header_at - start: header_at - start + length]
            if len(header) < length:
                header = self.pread(header_at, header_at + length)
            facts = _message_facts(header) if len(header) == length else None
            if facts is None or facts[1] < 0 or header_at + length + facts[1] > self.size:
                return Listing(out, cut=True)
            kind, body = facts
            end = header_at + length + body
            msg = Message(kind, start, end)
            if kind == RECORD_BATCH:
                msg.custom, msg.rows = header_facts(header)
            out.append(msg)
            start = end

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
        if sum(b - a for a, b in ranges) <= _JOIN_BYTES:
            # The small batches around the spans (aggregates, iterations, samples): read into
            # one buffer and decoded on this thread. Arrow decompresses each column buffer with
            # a new zstd context, so a batch of a few hundred rows costs ~0.3 ms whatever its
            # size; reading them through a Python file object and the thread pool added ~40 %.
            joined = pa.py_buffer(b"".join(self.pread(a, b) for a, b in ranges))
            return pa.ipc.open_stream(joined, options=_SMALL_READS)
        return pa.ipc.open_stream(_Ranges(self, ranges))


_HEADER_READ = 4096
# Up to this many bytes of messages are read into one buffer (above it: span batches, which
# Arrow decompresses faster on its threads, read range by range).
_JOIN_BYTES = 32 << 20
_SMALL_READS = pa.ipc.IpcReadOptions(use_threads=False)


class _Ranges(io.RawIOBase):
    """A read-only file made of byte ranges of a stream, one after the other."""

    def __init__(self, stream: Stream, ranges: list[tuple[int, int]]) -> None:
        self._stream = stream
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
        data = self._stream.pread(self._pos, min(self._end, self._pos + len(buf)))
        if not data:
            return 0  # the file is shorter than it was: a cut stream to Arrow
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def batches(reader: pa.ipc.RecordBatchStreamReader) -> Iterator[tuple[pa.RecordBatch, pa.KeyValueMetadata | None]]:
    """(batch, custom metadata) from a stream reader until its end; Arrow errors propagate."""
    while True:
        try:
            yield reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            return

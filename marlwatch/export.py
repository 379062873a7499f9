"""`marlwatch export FILE --to perfetto|parquet|csv -o OUT`: a recording in other tools' formats.

- `perfetto`: Chrome trace-event JSON (the object form, `{"traceEvents": [...]}`) that
  ui.perfetto.dev and chrome://tracing open. One process track per run process (`M` metadata
  events name them `learner`, `worker N`), spans as `X` complete events named by phase on thread 1,
  py-spy stack samples (rows of kind `stack`, see docs/flame.md) as `X` events on thread 2
  ("py-spy samples"), per-core utilisation and IPS as `C` counter events on a `machine` track,
  process CPU/RSS and gauges as counters on the process's track, run events as instant events.
  Timestamps are microseconds since the run started.
- `parquet` / `csv`: OUT is a directory that receives `spans`, `counters` (core, proc and gauge
  rows) and, when the recording holds py-spy samples, `stacks` tables.

Everything is streamed batch by batch: memory holds one batch plus, per process, the spans of
the top-level phase still being reordered (a span is recorded when it ends, so children come
before their parent; they are sorted back into start order before being written, so every
track's timestamps are monotonic).

Outputs are written with `marlwatch.outputs.atomic_output`: a failed export leaves OUT as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.metrics import Metrics, is_comm, top_of
from marlwatch.outputs import atomic_output
from marlwatch.recording import CORE, COUNTER, EVENT, PROC, SPAN, STACK, Recording

SPAN_TID, STACK_TID = 1, 2


def _us(t_ns: int) -> float:
    return t_ns / 1000.0


class PerfettoWriter:
    """Streams trace events into a JSON file, ordering each process's spans by start time."""

    def __init__(self, out: IO[str], rec: Recording) -> None:
        self.out = out
        self.first = True
        self.info = rec.info
        slots = sorted(int(s) for s in rec.info.procs) or [0]
        self.machine_pid = max(slots) + 2  # process tracks use slot + 1
        self.named: set[int] = set()
        self.pending: dict[int, list[tuple[int, int, str]]] = {}
        self.span_heads: dict[str | None, str] = {}
        self.last_stack: dict[int, dict[str, Any]] = {}
        self.metrics = Metrics(rec.info, rec.skipped)
        self.last_ips_t: int | None = None
        self.events = 0
        out.write('{"displayTimeUnit": "ms", "otherData": ')
        out.write(json.dumps({"marlwatch.run": json.loads(rec.info.to_json())}))
        out.write(', "traceEvents": [\n')
        self._meta(self.machine_pid, "machine", sort=-1)

    def _emit(self, ev: dict[str, Any] | str) -> None:
        """Write one event (a dict, or one already rendered as JSON text)."""
        text = ev if isinstance(ev, str) else json.dumps(ev, separators=(",", ":"))
        self.out.write(("" if self.first else ",\n") + text)
        self.first = False
        self.events += 1

    def _meta(self, pid: int, name: str, sort: int) -> None:
        self._emit({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
        self._emit({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": sort}})
        if pid != self.machine_pid:
            self._emit({"ph": "M", "name": "thread_name", "pid": pid, "tid": SPAN_TID, "args": {"name": "phases"}})
            self._emit({"ph": "M", "name": "thread_name", "pid": pid, "tid": STACK_TID,
                        "args": {"name": "py-spy samples"}})

    def _pid(self, slot: int | None) -> int:
        slot = int(slot or 0)
        if slot not in self.named:
            self.named.add(slot)
            role = self.info.procs.get(str(slot), "learner" if slot == 0 else f"worker {slot}")
            self._meta(slot + 1, role, sort=slot)
        return slot + 1

    def add(self, batch: pa.RecordBatch) -> None:
        self.metrics.add(batch)
        kind = batch.column("kind")
        kinds = set(pc.unique(kind).to_pylist())
        if SPAN in kinds:
            self._spans(batch.filter(pc.equal(kind, SPAN)))
        if STACK in kinds:
            self._stacks(batch.filter(pc.equal(kind, STACK)))
        if CORE in kinds:
            for t, core, v in _cols(batch.filter(pc.equal(kind, CORE)), "t_ns", "core", "value"):
                self._emit({"ph": "C", "name": f"cpu{core} %", "pid": self.machine_pid, "tid": 0, "ts": _us(t),
                            "args": {"value": v}})
        if PROC in kinds:
            for t, slot, name, v in _cols(batch.filter(pc.equal(kind, PROC)), "t_ns", "proc", "name", "value"):
                label, value = ("rss MB", v / 2**20) if name == "rss_bytes" else ("cpu %", v)
                self._emit({"ph": "C", "name": label, "pid": self._pid(slot), "tid": 0, "ts": _us(t),
                            "args": {"value": value}})
        if COUNTER in kinds:
            for t, slot, name, v in _cols(batch.filter(pc.equal(kind, COUNTER)), "t_ns", "proc", "name", "value"):
                self._emit({"ph": "C", "name": name, "pid": self._pid(slot), "tid": 0, "ts": _us(t),
                            "args": {"value": v}})
        if EVENT in kinds:
            for t, slot, name, text in _cols(batch.filter(pc.equal(kind, EVENT)), "t_ns", "proc", "name", "text"):
                try:
                    detail = json.loads(text) if text else {}
                except ValueError:
                    detail = {"text": text}
                pid = self.machine_pid if slot is None else self._pid(slot)
                self._emit({"ph": "i", "s": "p", "name": name, "pid": pid, "tid": SPAN_TID if slot is not None else 0,
                            "ts": _us(t), "args": detail if isinstance(detail, dict) else {"detail": detail}})
        # IPS as the live view shows it (Metrics' rate over the last seconds), once per batch.
        if "iter" in kinds:
            snap = self.metrics.snapshot()
            t = self.metrics.t_ns
            if self.last_ips_t is None or t > self.last_ips_t:
                self.last_ips_t = t
                self._emit({"ph": "C", "name": "IPS", "pid": self.machine_pid, "tid": 0, "ts": _us(t),
                            "args": {"value": round(snap.ips_now, 3)}})

    def _spans(self, b: pa.RecordBatch) -> None:
        # Spans are most of a recording: rendered with a format string (names JSON-escaped once)
        # rather than json.dumps per event, ~3x faster.
        for slot, name, parent, t, dur, it in _cols(b, "proc", "name", "parent", "t_ns", "dur_ns", "iter"):
            pid = self._pid(slot)
            head = self.span_heads.get(name)
            if head is None:
                cat = "comm" if is_comm(name) else top_of(name or "")
                head = self.span_heads[name] = f'{{"ph":"X","name":{json.dumps(name)},"cat":"{cat}"'
            ev = (f'{head},"pid":{pid},"tid":{SPAN_TID},"ts":{t / 1000:.3f},"dur":{dur / 1000:.3f},'
                  f'"args":{{"iter":{"null" if it is None else it}}}}}')
            buf = self.pending.setdefault(pid, [])
            buf.append((t, -dur, ev))
            if parent is None:
                # A top-level span just ended: nothing still to come in this process starts before
                # its end (one thread per process), so everything held back can be written in order.
                self._flush(pid)

    def _flush(self, pid: int) -> None:
        buf = self.pending.pop(pid, [])
        buf.sort(key=lambda x: (x[0], x[1]))  # start time; a parent before its children
        for _, _, ev in buf:
            self._emit(ev)

    def _stacks(self, b: pa.RecordBatch) -> None:
        # Each row becomes a slice on the process's "py-spy samples" track. A row's duration is
        # its sample count / rate, which can reach past the next row's start: slices of one
        # track may not overlap, so each is held until the next one is known and cut there.
        for slot, phase, t, dur, stack, count in _cols(b, "proc", "name", "t_ns", "dur_ns", "text", "value"):
            pid = self._pid(slot)
            prev = self.last_stack.get(pid)
            if prev is not None:
                prev["dur"] = max(0.0, min(prev["dur"], _us(t) - prev["ts"]))
                self._emit(prev)
            leaf = (stack or "?").rsplit(";", 1)[-1]
            self.last_stack[pid] = {"ph": "X", "name": leaf, "cat": "py-spy", "pid": pid, "tid": STACK_TID,
                                    "ts": _us(t), "dur": _us(dur or 0),
                                    "args": {"phase": phase, "samples": count, "stack": stack}}

    def close(self) -> None:
        for pid in list(self.pending):
            self._flush(pid)
        for ev in self.last_stack.values():
            self._emit(ev)
        self.out.write("\n]}\n")


def _cols(b: pa.RecordBatch, *names: str) -> Iterator[tuple]:
    return zip(*(b.column(n).to_pylist() for n in names), strict=True)


# -- tables ---------------------------------------------------------------------------------
TABLES: dict[str, tuple[tuple[str, ...], list[tuple[str, str]]]] = {
    # table -> (kinds, [(output column, recording column)])
    "spans": ((SPAN,), [("proc", "proc"), ("name", "name"), ("parent", "parent"), ("t_ns", "t_ns"),
                        ("dur_ns", "dur_ns"), ("iter", "iter")]),
    "counters": ((CORE, PROC, COUNTER), [("kind", "kind"), ("proc", "proc"), ("core", "core"), ("name", "name"),
                                         ("t_ns", "t_ns"), ("value", "value")]),
    "stacks": ((STACK,), [("proc", "proc"), ("phase", "name"), ("t_ns", "t_ns"), ("dur_ns", "dur_ns"),
                          ("stack", "text"), ("samples", "value")]),
}


def _table_schema(src: pa.Schema, cols: list[tuple[str, str]]) -> pa.Schema:
    return pa.schema([pa.field(out, src.field(col).type) for out, col in cols])


def export_tables(rec: Recording, out_dir: Path, fmt: str) -> dict[str, int]:
    """Write spans/counters[/stacks] tables as parquet or csv files in out_dir; returns rows per table.

    Each table goes through `atomic_output`: all of them are renamed into place once every one was
    written, and a failure leaves the folder as it was."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    def open_table(table: str) -> Any:
        schema = _table_schema(rec.schema, TABLES[table][1])
        f = files.enter_context(atomic_output(out_dir / f"{table}.{fmt}", binary=True, inputs=(rec.path,)))
        w = pq.ParquetWriter(f, schema, compression="zstd") if fmt == "parquet" else pcsv.CSVWriter(f, schema)
        files.callback(_close_quietly, w)  # on a failure: closed before its file is removed
        return w

    writers: dict[str, Any] = {}
    rows = dict.fromkeys(TABLES, 0)
    with ExitStack() as files:
        for batch in rec.batches():
            kind = batch.column("kind")
            for table, (kinds, cols) in TABLES.items():
                sel = batch.filter(pc.is_in(kind, pa.array(kinds)))
                if sel.num_rows == 0:
                    continue
                part = pa.RecordBatch.from_arrays([sel.column(c) for _, c in cols],
                                                  schema=_table_schema(rec.schema, cols))
                if table not in writers:
                    writers[table] = open_table(table)
                writers[table].write_batch(part)
                rows[table] += part.num_rows
        for table in ("spans", "counters"):  # always present, even when empty
            if table not in writers:
                writers[table] = open_table(table)
        for w in writers.values():
            w.close()  # before the files are renamed into place (on leaving the ExitStack)
    return rows


def _close_quietly(writer: Any) -> None:
    try:
        writer.close()  # a second close does nothing
    except (OSError, ValueError, pa.ArrowException):
        pass


def export_perfetto(rec: Recording, out: IO[str]) -> int:
    """Write the recording as Chrome trace-event JSON; returns the number of events."""
    w = PerfettoWriter(out, rec)
    for batch in rec.batches():
        w.add(batch)
    w.close()
    return w.events

"""Crafted recordings for the tests of untrusted input: rows written with pyarrow directly, so a
test can put anything in them that a file could hold (the writer would never write it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from marlwatch.recording import BATCH_SEQ_KEY, FORMAT_KEY, FORMAT_VERSION, METADATA_KEY, SCHEMA

INFO: dict[str, Any] = {
    "algo": "maddpg", "env": "simple_spread", "agents": 3, "workers": 1, "seed": 0, "iterations": 8,
    "host": "h", "cores": 2, "procs": {"0": "learner", "1": "worker 1"}, "pinning": {"0": 0, "1": 1},
}
MS = 1_000_000


def run_rows(iterations: int = 8, *, phase: str = "update/critic", first: int = 0, stack: str | None = None
             ) -> list[dict[str, Any]]:
    """The rows of a small, valid run: per iteration a sample and an update span (with `phase`
    inside it) in the learner and a worker, their iteration rows, core and process samples, a
    gauge, and py-spy stack rows of `phase` (folded stack `stack`)."""
    rows: list[dict[str, Any]] = []
    if first == 0:
        rows += [{"kind": "event", "proc": slot, "name": "started", "t_ns": 0,
                  "text": json.dumps({"pid": 100 + slot, "core": slot})} for slot in (0, 1)]
    for i in range(first, first + iterations):
        t = (i + 1) * 20 * MS
        for slot in (0, 1):
            rows += [
                {"kind": "span", "proc": slot, "name": "sample", "t_ns": t, "dur_ns": 8 * MS, "iter": i},
                {"kind": "span", "proc": slot, "name": phase, "parent": "update", "t_ns": t + 9 * MS,
                 "dur_ns": 4 * MS + i * 10_000, "iter": i},
                {"kind": "span", "proc": slot, "name": "update", "t_ns": t + 8 * MS, "dur_ns": 7 * MS, "iter": i},
                {"kind": "iter", "proc": slot, "t_ns": t + 16 * MS, "iter": i + 1},
                {"kind": "proc", "proc": slot, "name": "cpu_percent", "t_ns": t, "value": 90.0},
            ]
        rows += [{"kind": "core", "core": c, "t_ns": t, "value": 75.0} for c in (0, 1)]
        rows.append({"kind": "counter", "proc": 0, "name": "episode_return", "t_ns": t + 16 * MS, "value": -5.0 + i})
        rows.append({"kind": "stack", "proc": 0, "name": phase, "t_ns": t + 10 * MS, "dur_ns": 2 * MS, "iter": i,
                     "value": 3.0, "text": stack or f"learner_main (marlwatch/process.py:1);{phase} (a.py:2)"})
    return rows


def end_row(t_ns: int = 10**10) -> dict[str, Any]:
    return {"kind": "end", "t_ns": t_ns, "text": json.dumps({"rows": 0})}


def write(path: Path, batches: list[list[dict[str, Any]]], *, info: dict[str, Any] | None = None,
          meta: str | bytes | None = None, schema: pa.Schema = SCHEMA, seq: list[int] | bool = True) -> Path:
    """A recording of `batches` (lists of rows), run metadata `info` (or the raw `meta`), each
    batch numbered as the writer numbers it (`seq`: True, False for none, or the numbers)."""
    text = meta if meta is not None else json.dumps(INFO if info is None else info)
    numbers = list(range(len(batches))) if seq is True else (seq or [None] * len(batches))
    meta = {METADATA_KEY: text}
    if any(pa.types.is_dictionary(f.type) for f in schema):  # format 2's columns; else format 1's
        meta[FORMAT_KEY] = str(FORMAT_VERSION)
    with pa.ipc.new_stream(str(path), schema.with_metadata(meta)) as w:
        for rows, n in zip(batches, numbers, strict=True):
            batch = pa.RecordBatch.from_pylist(rows, schema=schema)
            w.write_batch(batch, custom_metadata=None if n is None else {BATCH_SEQ_KEY: str(n)})
    return path


def run_file(path: Path, *, complete: bool = True, **kw: Any) -> Path:
    """A valid recording in two batches (and the end marker); `kw` go to run_rows."""
    rows = run_rows(**kw)
    half = len(rows) // 2
    return write(path, [rows[:half], rows[half:] + ([end_row()] if complete else [])])

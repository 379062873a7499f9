"""`marlwatch repair FILE [-o OUT]`: rewrite a damaged recording from its complete batches.

A run killed mid-write (SIGKILL, power loss, a full disk) leaves a file whose last record batch
is cut. `summary` and the other readers already read such a file up to its last complete batch;
`repair` makes that permanent: it writes every complete batch to a new, well-formed stream
(same run metadata, written as the writer writes: the current format, with aggregates, so it
also upgrades a file of an older format), adds an `event` row named ``repaired`` that says what
was kept and that the tail was lost, and warns about it. It does not add the end-of-run marker:
the run did not end there, and readers must keep saying so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.outputs import atomic_output
from marlwatch.recording import (
    EVENT,
    FORMAT_KEY,
    FORMAT_VERSION,
    METADATA_KEY,
    SCHEMA,
    SPAN,
    _Encoder,
    kind_codes,
    open_recording,
)

__all__ = ["default_output", "repair"]


def default_output(path: Path) -> Path:
    return path.with_name(path.stem + ".repaired.arrow")


def repair(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Copy every complete batch of `src` to `dst` (with `atomic_output`), plus a `repaired` note row.

    The batches are the reader's (marlwatch/validate.py): what it skips as invalid is left out,
    and the batches are numbered afresh. Returns what was kept (`skipped`: what was left out, or
    None); raises RecordingError when `src` is not a readable recording and OutputError when
    `dst` cannot be written or is `src`."""
    rec = open_recording(src)
    dst = Path(dst)
    rows = spans = 0
    last_t = 0
    schema = SCHEMA.with_metadata({METADATA_KEY: rec.schema.metadata[METADATA_KEY], FORMAT_KEY: str(FORMAT_VERSION)})
    with atomic_output(dst, binary=True, inputs=(rec.path,)) as f:
        enc = _Encoder(f, schema)
        for b in rec.batches():
            enc.write(pa.Table.from_batches([b]))
            rows += b.num_rows
            kinds, codes = kind_codes(b)
            spans += int((codes == kinds.index(SPAN)).sum()) if SPAN in kinds else 0
            t = pc.max(b.column("t_ns")).as_py()
            last_t = max(last_t, t or 0)
        note = {"source": str(rec.path), "batches": rec.batches_read, "rows": rows,
                "tail_lost": rec.truncated_mid_batch, "complete": bool(rec.complete)}
        # After an end marker nothing may follow; a complete file is just copied.
        tail = [] if rec.complete else [pa.RecordBatch.from_pylist(
            [{"kind": EVENT, "name": "repaired", "t_ns": last_t, "text": json.dumps(note)}], schema=SCHEMA)]
        enc.write(pa.Table.from_batches(tail, schema=SCHEMA), final=True)
        enc.close()
    return {**note, "spans": spans, "output": str(dst), "skipped": rec.skipped.describe() if rec.skipped else None}


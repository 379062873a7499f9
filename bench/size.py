"""Benchmark 4: recording size, bytes per span and per core sample on disk.

Measured on a real MADDPG recording (3 agents, 2 workers; the one benchmark 2 made, or a
fresh run of 500 iterations, the default `marlwatch run`'s length; 150 with --quick). Two figures: the whole file over its span count (everything included:
iteration rows, core and process samples, counters, events, the aggregates; target 8 B), and
the marginal cost of one row of a kind. For the latter (compression works per batch, so batch boundaries
matter) the file is rewritten batch for batch with the real
`RecordingWriter`, once whole and once without the rows of one kind, and the difference is
divided by the number of rows of that kind: what one more span (or core sample) costs on disk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import main_for, row

TARGET = 8.0  # issue 14: bytes per span, the whole file (every row kind) over its spans


def rewrite(src: Path, out: Path, drop: str | None = None) -> int:
    """Rewrite `src` batch for batch with the real writer, without rows of kind `drop`; rows dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from marlwatch.recording import RecordingWriter, open_recording

    rec = open_recording(src)
    dropped = 0
    with RecordingWriter(out, rec.info, overwrite=True) as w:  # out: our own temporary file
        for b in rec.batches():
            if drop is not None:
                keep = pc.not_equal(b.column("kind").cast(pa.string()), drop)
                dropped += b.num_rows - (pc.sum(keep).as_py() or 0)
                b = b.filter(keep)
            if b.num_rows:
                w.append(b)
                w.flush()
        w.close(complete=False)
    return dropped


def marginal_bytes(src: Path, kind: str, tmp: Path) -> tuple[int, int]:
    """(bytes, rows) that the rows of `kind` add to the file: with them minus without them."""
    full, without = tmp / "full.arrow", tmp / f"no-{kind}.arrow"
    rewrite(src, full)
    rows = rewrite(src, without, drop=kind)
    return full.stat().st_size - without.stat().st_size, rows


def measure(quick: bool = False, record: Path | None = None) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    from marlwatch.recording import open_recording

    with tempfile.TemporaryDirectory(prefix="mw-size-") as tmp_s:
        tmp = Path(tmp_s)
        if record is None:
            import overhead

            record = tmp / "run.arrow"
            # As long as the default `marlwatch run` (500 iterations): a file's fixed parts (schema,
            # dictionaries, end row: ~10 KB) weigh more per span in a shorter run.
            overhead.real_run("maddpg", True, 150 if quick else 500, record)
        counts: dict[str, int] = {}
        for b in open_recording(record).batches():
            for d in pc.value_counts(b.column("kind").cast(pa.string())).to_pylist():
                counts[d["values"]] = counts.get(d["values"], 0) + d["counts"]
        total = record.stat().st_size
        span_b, span_n = marginal_bytes(record, "span", tmp)
        core_b, core_n = marginal_bytes(record, "core", tmp)
    per_span = span_b / span_n
    per_span_all = total / counts.get("span", 1)
    out = {"file_bytes": total, "rows": counts, "bytes_per_span": per_span, "bytes_per_span_whole_file": per_span_all,
           "bytes_per_core_sample": core_b / core_n if core_n else float("nan")}
    out["rows_by_kind"] = out.pop("rows")
    out["rows"] = [
        row("recording: whole file / spans", f"{per_span_all:.2f} B", f"<= {TARGET:.0f} B", per_span_all <= TARGET,
            f"{counts.get('span', 0):,} spans of a real MADDPG run; {total / 1024:.0f} KB incl. "
            f"iter/core/proc/counter/event rows and aggregates"),
        row("recording: bytes per span (marginal)", f"{per_span:.1f} B", "", None,
            "one more span, its share of the aggregates included"),
        row("recording: bytes per core sample (marginal)", f"{out['bytes_per_core_sample']:.1f} B", "", None,
            f"{core_n:,} samples (one row per core per 0.1 s)"),
    ]
    return out


if __name__ == "__main__":
    raise SystemExit(main_for(measure))

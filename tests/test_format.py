"""Recording format 2: dictionary columns, aggregates beside the spans, the version check, and
format 1 files (every shipped recording) still read by every command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from marlwatch import aggregates, ipcscan
from marlwatch.cli import main
from marlwatch.diff import compare, read_side
from marlwatch.metrics import summarize
from marlwatch.recording import (
    FORMAT_KEY,
    METADATA_KEY,
    SCHEMA,
    RecordingWriter,
    RunInfo,
    open_recording,
)
from tests.conftest import REPO
from tests.hostile import INFO, end_row, write
from tests.test_reading_boundary import one_line_error

SHIPPED = sorted((REPO / "recordings").rglob("*.arrow"))
MS = 1_000_000
PHASES = [("sample", None, 8 * MS), ("sample/env_step", "sample", 90_000), ("sample/act", "sample", 40_000),
          ("update", None, 5 * MS), ("update/comm/joint", "update", 300_000), ("sync/wait", None, 2 * MS)]


def _rows(rng: np.random.Generator, iterations: int, first: int = 0) -> list[dict]:
    """A learner and two workers: per iteration each phase a few times with log-normal durations."""
    rows: list[dict] = []
    for i in range(first, first + iterations):
        t = (i + 1) * 30 * MS
        for slot in (0, 1, 2):
            for name, parent, median in PHASES:
                for k in range(1 if parent is None else 5):
                    rows.append({"kind": "span", "proc": slot, "name": name, "parent": parent,
                                 "t_ns": t + k * 1000 + int(rng.integers(0, 10 * MS)),
                                 "dur_ns": int(median * rng.lognormal(0, 0.6)), "iter": i})
            rows.append({"kind": "iter", "proc": slot, "t_ns": t + 20 * MS, "iter": i + 1})
        rows += [{"kind": "core", "core": c, "t_ns": t, "value": 50.0 + c} for c in (0, 1)]
    return rows


def record(path: Path, iterations: int = 60, *, complete: bool = True, seed: int = 0,
           per_flush: int = 5) -> Path:
    """A recording written by the real writer, one flush per `per_flush` iterations."""
    rng = np.random.default_rng(seed)
    info = RunInfo(**{k: INFO[k] for k in ("algo", "env", "agents", "seed", "iterations")}, workers=2,
                   procs={"0": "learner", "1": "worker 1", "2": "worker 2"})
    w = RecordingWriter(path, info, flush_interval_s=1e9)
    for first in range(0, iterations, per_flush):
        w.append(pa.RecordBatch.from_pylist(_rows(rng, per_flush, first), schema=SCHEMA))
        w.flush()
    w.close(complete=complete, t_ns=(iterations + 2) * 30 * MS)
    return path


@pytest.fixture
def small_groups(monkeypatch):
    """Aggregates every ~3 flushes, so a small file has several groups."""
    monkeypatch.setattr(aggregates, "SPANS_PER_GROUP", 1200)


def _same_except_percentiles(a: dict, b: dict) -> None:
    for key in a:
        if key != "phases":
            assert a[key] == b[key], key
    assert a["phases"].keys() == b["phases"].keys()
    for name, pa_ in a["phases"].items():
        pb = b["phases"][name]
        for f in pa_:
            if f in ("p50_ms", "p95_ms", "p99_ms"):
                assert abs(pa_[f] / pb[f] - 1) <= aggregates.RELATIVE_ERROR + 1e-12, (name, f, pa_[f], pb[f])
            else:
                assert pa_[f] == pb[f], (name, f)


# -- percentiles from histograms vs exact ----------------------------------------------------------
@pytest.mark.parametrize("dist", ["lognormal", "uniform", "pareto", "few"])
def test_histogram_percentiles_are_within_the_stated_bound_of_exact(dist):
    rng = np.random.default_rng(7)
    values = {"lognormal": rng.lognormal(12, 1.5, 50_000), "uniform": rng.uniform(1e3, 1e8, 50_000),
              "pareto": 1e4 * (1 + rng.pareto(1.2, 50_000)), "few": rng.lognormal(10, 2, 7)}[dist]
    values = np.maximum(values.astype(np.int64), 1)
    qs = (0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999)
    hist = np.bincount(aggregates.bins(values), minlength=aggregates.N_BINS)
    # Histograms merge by adding: two halves give the same answer as the whole.
    half = len(values) // 2
    merged = np.bincount(aggregates.bins(values[:half]), minlength=aggregates.N_BINS) + \
        np.bincount(aggregates.bins(values[half:]), minlength=aggregates.N_BINS)
    assert (merged == hist).all()
    for approx, exact in zip(aggregates.quantiles_from_hist(hist, qs), aggregates.exact_quantiles(values, qs),
                             strict=True):
        assert abs(approx / exact - 1) <= aggregates.RELATIVE_ERROR, (approx, exact)
    assert aggregates.RELATIVE_ERROR < 0.011


# -- aggregates give the spans' figures ------------------------------------------------------------
def test_summary_from_aggregates_matches_every_span(tmp_path, small_groups):
    path = record(tmp_path / "r.arrow")
    rec = open_recording(path)
    fast = summarize(rec)
    assert rec.used_aggregates and rec.complete
    exact = summarize(open_recording(path), exact=True)
    _same_except_percentiles(fast.to_json(), exact.to_json())
    # The exact path's percentiles are the spans' own.
    durations = [r["dur_ns"] for r in _rows(np.random.default_rng(0), 60) if r.get("name") == "sample/act"
                 and r["iter"] > 0]
    want = aggregates.exact_quantiles(np.array(durations), (0.5, 0.95, 0.99))
    got = exact.to_json()["phases"]["sample/act"]
    assert [got["p50_ms"], got["p95_ms"], got["p99_ms"]] == [w / 1e6 for w in want]


def test_the_covered_span_batches_are_not_read(tmp_path, small_groups):
    path = record(tmp_path / "r.arrow")
    rec = open_recording(path)
    kinds = {}
    for b in rec.batches(aggregates=True):
        for d in pc.value_counts(b.column("kind").cast(pa.string())).to_pylist():
            kinds[d["values"]] = kinds.get(d["values"], 0) + d["counts"]
    assert "span" not in kinds and kinds["span_sum"] and kinds["span_hist"]
    kinds_exact = set()
    for b in open_recording(path).batches():
        kinds_exact |= set(b.column("kind").dictionary.to_pylist()[i] for i in pc.unique(b.column("kind").indices).to_pylist())
    assert "span" in kinds_exact and not kinds_exact & {"span_sum", "span_hist"}


@pytest.mark.parametrize("aggregated", [True, False])
def test_both_ways_of_serving_the_messages_read_the_same_batches(tmp_path, small_groups, monkeypatch, aggregated):
    """ipcscan serves small subsets from one joined copy (decoded on this thread) and large ones
    range by range; the batches are the same either way."""
    path = record(tmp_path / "r.arrow")
    joined = list(open_recording(path).batches(aggregates=aggregated))
    monkeypatch.setattr(ipcscan, "_JOIN_BYTES", 0)
    mapped = list(open_recording(path).batches(aggregates=aggregated))
    assert len(joined) == len(mapped) and sum(b.num_rows for b in joined) > 100
    for a, b in zip(joined, mapped, strict=True):
        assert a.equals(b)


_CUT_WHILE_READ = """
import os, shutil, sys
import pyarrow as pa
from marlwatch import ipcscan
source, path, join_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
ipcscan._JOIN_BYTES = join_bytes
shutil.copy(source, path)
with ipcscan.Stream(path) as stream:
    listing = stream.listing()
    record = [m for m in listing.messages if m.type == ipcscan.RECORD_BATCH]
    half = len(record) // 2
    # another process cuts the file short under the reader, in the middle of a batch
    os.truncate(path, (record[half].start + record[half].end) // 2)
    read = 0
    try:
        for _batch, _custom in ipcscan.batches(stream.reader(listing.messages, record)):
            read += 1
    except (pa.ArrowInvalid, OSError) as e:
        print("cut", read, half)
"""


@pytest.mark.parametrize("join_bytes", [32 << 20, 0], ids=["joined", "by-range"])
def test_a_file_cut_short_while_it_is_read_reads_as_cut_not_as_a_crash(tmp_path, join_bytes):
    """The reader lists a file, then another process truncates it (a user's `> run.arrow`): the
    batches before the cut read, and the rest is a cut stream. Through a memory map this was a
    SIGBUS that killed the process (here, the child; in a test run, an xdist worker)."""
    import subprocess
    import sys

    shipped = REPO / "recordings" / "maddpg-3agents-2workers.arrow"
    r = subprocess.run([sys.executable, "-c", _CUT_WHILE_READ, str(shipped), str(tmp_path / "cut.arrow"),
                        str(join_bytes)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    _, read, half = r.stdout.split()
    assert int(read) == int(half) > 5


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_a_file_cut_after_its_aggregates_reads_the_rest_as_spans(tmp_path, small_groups, fraction):
    path = record(tmp_path / "r.arrow", 80)
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
    rec = open_recording(cut)
    fast = summarize(rec)
    exact = summarize(open_recording(cut), exact=True)
    assert rec.used_aggregates and not fast.complete and 0 < fast.iterations < 80
    _same_except_percentiles(fast.to_json(), exact.to_json())


def test_diff_from_aggregates_is_diff_from_spans(tmp_path, small_groups):
    a, b = record(tmp_path / "a.arrow", seed=1), record(tmp_path / "b.arrow", seed=2)
    def diff(exact: bool):
        return compare(*(read_side(open_recording(p), exact=exact) for p in (a, b)))

    fast, exact = diff(False), diff(True)
    assert fast.to_json() == exact.to_json()


def test_summary_exact_flag(tmp_path, capsys, small_groups):
    path = record(tmp_path / "r.arrow")
    assert main(["summary", str(path), "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main(["summary", str(path), "--json", "--exact"]) == 0
    exact = json.loads(capsys.readouterr().out)
    _same_except_percentiles(fast, exact)


# -- other readers --------------------------------------------------------------------------------
def test_pyarrow_polars_and_duckdb_read_it_without_marlwatch(tmp_path, small_groups):
    path = record(tmp_path / "r.arrow")
    snap = summarize(open_recording(path), exact=True)
    total = sum(p.total_s for p in snap.phases if p.name == "sample/act")
    table = pa.ipc.open_stream(path.read_bytes()).read_all()
    assert table.schema.metadata[FORMAT_KEY] == b"2" and json.loads(table.schema.metadata[METADATA_KEY])["algo"]
    spans = table.filter(pc.and_(pc.equal(table.column("kind"), "span"), pc.greater(table.column("iter"), 0)))
    act = spans.filter(pc.equal(spans.column("name"), "sample/act"))
    assert pc.sum(act.column("dur_ns")).as_py() / 1e9 == pytest.approx(total)
    # The aggregates say the same, without the spans: per process and phase (start-up apart), and
    # per iteration.
    for kind, later in (("span_sum", pc.is_null(table.column("iter"))), ("span_iter", pc.greater(table.column("iter"), 0))):
        sums = table.filter(pc.and_(pc.equal(table.column("kind"), kind), later))
        sums = sums.filter(pc.equal(sums.column("name"), "sample/act"))
        assert pc.sum(sums.column("dur_ns")).as_py() == pc.sum(act.column("dur_ns")).as_py()
        assert pc.sum(sums.column("value")).as_py() == act.num_rows
    pl = pytest.importorskip("polars")
    df = pl.read_ipc_stream(path)
    got = df.filter((pl.col("kind") == "span") & (pl.col("name") == "sample/act") & (pl.col("iter") > 0))
    assert got["dur_ns"].sum() == pc.sum(act.column("dur_ns")).as_py()
    duckdb = pytest.importorskip("duckdb")  # a bench extra, not a test one: checked where installed
    run = table  # noqa: F841 - DuckDB finds the frame by its name
    (n, s), = duckdb.sql("select count(*), sum(dur_ns) from run where kind = 'span' and name = 'sample/act' "
                         "and iter > 0").fetchall()
    assert (n, s) == (act.num_rows, pc.sum(act.column("dur_ns")).as_py())


def _codec(header: bytes) -> str:
    """The codec a record batch message's header names (Arrow's Message.fbs: Message.header is a
    RecordBatch, whose field 3 is its BodyCompression, whose field 0 is the codec, LZ4_FRAME = 0
    when absent)."""
    fb = ipcscan._FlatBuffer(header)
    batch = fb.ref(fb.field(fb.root(), 2))
    compression = fb.field(batch, 3)
    if not compression:
        return "none"
    codec = fb.field(fb.ref(compression), 0)
    return {0: "lz4", 1: "zstd"}[header[codec] if codec else 0]


def test_spans_are_zstd_and_the_batches_the_figures_read_are_lz4(tmp_path, small_groups):
    path = record(tmp_path / "r.arrow")
    seen: dict[bytes | None, set[str]] = {}
    reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(path.read_bytes()))
    while True:
        try:
            m = reader.read_next_message()
        except StopIteration:
            break
        if m.type == ipcscan.RECORD_BATCH:
            custom, rows = ipcscan.header_facts(m.metadata.to_pybytes())
            # The empty batches that bring the dictionaries up to date say nothing of themselves.
            assert rows > 0 or not custom
            if rows:
                seen.setdefault(custom.get(b"marlwatch.part"), set()).add(_codec(m.metadata.to_pybytes()))
    assert seen == {b"spans": {"zstd"}, b"aggregates": {"lz4"}, b"iterations": {"lz4"}, b"rows": {"lz4"}}


# -- versions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO / "recordings")) for p in SHIPPED])
def test_every_shipped_recording_opens(path, capsys):
    """Those written before format 2 (recordings/maddpg-*.arrow, recordings/sweep-tom2c/) and after."""
    rec = open_recording(path)
    assert rec.version in (1, 2)
    assert main(["summary", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["iterations"] > 0 and out["phases"]


def test_format_1_in_every_reading_command(tmp_path, capsys):
    old = REPO / "recordings" / "maddpg-flame.arrow"
    assert open_recording(old).version == 1
    for argv in (["summary", str(old)], ["summary", str(old), "--exact"], ["diff", str(old), str(old)],
                 ["export", str(old), "--to", "parquet", "-o", str(tmp_path / "x.parquet")],
                 ["flame", str(old), "--phase", "update"], ["repair", str(old), "-o", str(tmp_path / "r.arrow")]):
        assert main(argv) == 0, argv
        capsys.readouterr()


def test_repair_upgrades_format_1_with_the_same_figures(tmp_path, capsys):
    old = REPO / "recordings" / "maddpg-3agents-2workers.arrow"
    assert open_recording(old).version == 1
    new = tmp_path / "new.arrow"
    assert main(["repair", str(old), "-o", str(new)]) == 0
    rec = open_recording(new)
    assert rec.version == 2
    assert summarize(rec).to_json() == summarize(open_recording(old)).to_json()
    assert rec.used_aggregates
    assert new.stat().st_size < 0.7 * old.stat().st_size


@pytest.mark.parametrize("version", [b"3", b"99"])
def test_a_newer_format_is_one_line_and_exit_2(tmp_path, capsys, version):
    path = write(tmp_path / "new.arrow", [[end_row()]])
    data = path.read_bytes()
    table = pa.ipc.open_stream(data).read_all()
    meta = dict(table.schema.metadata)
    meta[FORMAT_KEY] = version
    with pa.ipc.new_stream(str(path), table.schema.with_metadata(meta)) as w:
        w.write_table(table)
    err = one_line_error(capsys, ["summary", str(path)])
    assert f"recording format {version.decode()} is newer than this marlwatch reads" in err


def test_a_damaged_format_version_is_one_line(tmp_path, capsys):
    table = pa.ipc.open_stream(write(tmp_path / "a.arrow", [[end_row()]]).read_bytes()).read_all()
    path = tmp_path / "bad.arrow"
    with pa.ipc.new_stream(str(path), table.schema.with_metadata({**table.schema.metadata, FORMAT_KEY: b"two"})) as w:
        w.write_table(table)
    assert "damaged format version" in one_line_error(capsys, ["summary", str(path)])


def test_aggregates_claiming_later_batches_cover_nothing(tmp_path, small_groups):
    """Aggregates without a usable `marlwatch.covers` (here: none at all) stand for nothing: the
    spans are read, and the aggregates are not counted on top of them."""
    path = record(tmp_path / "r.arrow")
    forged = tmp_path / "f.arrow"
    forged.write_bytes(path.read_bytes().replace(b"marlwatch.covers", b"marlwatch.cOvers"))
    rec = open_recording(forged)
    fast = summarize(rec)
    assert not rec.used_aggregates
    assert fast.to_json() == summarize(open_recording(path)).to_json()


# -- replay ----------------------------------------------------------------------------------------
def test_replay_jumps_rebuild_from_aggregates_with_the_figures_of_every_row(tmp_path, small_groups):
    from marlwatch.playback import Playback

    path = record(tmp_path / "r.arrow", 80)
    pb = Playback.from_recording(open_recording(path))
    every = open_recording(path)
    ref = Playback(every.info, every.batches)  # reads every row: no aggregates
    assert pb.rows == ref.rows and (pb.start_ns, pb.end_ns) == (ref.start_ns, ref.end_ns)
    spans = sum(p.rows for p in pb._parts if p.part == b"spans")
    for at in (1.0, 0.5, 0.1, 0.9, 0.3, 1.0):  # to the end, back, further back, forward past unread spans
        pb.seek_s(pb.duration_s * at)
        ref.seek_s(ref.duration_s * at)
        assert pb.snapshot().to_json() == ref.snapshot().to_json(), at
        assert pb.at_end == ref.at_end
        if at >= 0.9:  # most spans came from aggregates: their batches were not read
            read = sum(p.rows for p in pb._index_parts if p.part == b"spans")
            assert read == 0 if at == 1.0 else read < spans / 2
    pb.seek_s(pb.duration_s * 0.4)
    ref.seek_s(ref.duration_s * 0.4)
    for _ in range(6):  # then played forward in small steps, fed row by row
        pb.step(0.05)
        ref.step(0.05)
        assert pb.snapshot().to_json() == ref.snapshot().to_json()


def test_replay_jumps_count_what_the_reader_skipped_every_time(tmp_path, small_groups):
    """Jumps keep the aggregates and other rows they read (only spans are read again); a file
    with an invalid row still says so after every jump, and the figures stay those of every row."""
    from marlwatch.playback import Playback

    path = tmp_path / "bad.arrow"
    info = RunInfo(**{k: INFO[k] for k in ("algo", "env", "agents", "seed", "iterations")}, workers=2)
    rng = np.random.default_rng(3)
    with RecordingWriter(path, info, flush_interval_s=1e9) as w:
        for first in range(0, 40, 5):
            rows = _rows(rng, 5, first)
            if first == 20:
                rows.append({"kind": "core", "core": 0, "t_ns": (first + 1) * 30 * MS, "value": math.nan})
            w.append(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
            w.flush()
    rec = open_recording(path)
    pb = Playback.from_recording(rec)
    ref = Playback(rec.info, lambda: list(open_recording(path).batches()))
    for at in (1.0, 0.2, 1.0, 0.7, 0.0, 1.0):
        pb.seek_s(pb.duration_s * at)
        ref.seek_s(ref.duration_s * at)
        assert pb.snapshot().to_json() == ref.snapshot().to_json()
        if at == 1.0:
            assert sum(rec.skipped.rows.values()) == 1, rec.skipped.describe()
    assert pb._cache  # the batches read before the invalid row are kept

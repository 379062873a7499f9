"""Bad input, fuzzed with hypothesis: damaged and foreign files, malformed flag values.

Every reader command must answer a bad file with exit 2 and one line (`marlwatch: ...`), or
read what is readable (exit 0), and never raise or hang. The CLI runs in-process (`main([...])`)
for speed; a few cases run the real command in a subprocess as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marlwatch.cli import UsageError, main
from marlwatch.cli.files import load_replay
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(240)

SMALL = REPO / "recordings" / "maddpg-3agents-2workers.arrow"
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> bytes:
    """A real recording, cut to its first ~120 KB of complete batches so each example is quick."""
    from marlwatch.repair import repair

    data = SMALL.read_bytes()
    d = tmp_path_factory.mktemp("fuzz")
    cut = d / "cut.arrow"
    cut.write_bytes(data[:120_000])
    repair(cut, d / "small.arrow")
    return (d / "small.arrow").read_bytes()


def check(capsys, argv: list[str]) -> int:
    """Run the CLI; it must succeed or fail with exactly one `marlwatch:` line on stderr."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 0:
        return code
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marlwatch: "), err
    return code


def readers(path: Path, tmp: Path) -> list[list[str]]:
    return [["summary", str(path)], ["summary", str(path), "--json"],
            ["diff", str(path), str(path), "--resamples", "100"],  # the fewest diff takes
            ["export", str(path), "--to", "perfetto", "-o", str(tmp / "trace.json")]]


def feed(capsys, tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzzed.arrow"
    path.write_bytes(data)
    for argv in readers(path, tmp_path):
        check(capsys, argv)
    # The replay command reads the whole file before it opens the app: that part must fail cleanly.
    try:
        load_replay(str(path))
    except UsageError as e:
        assert "\n" not in str(e)


@FUZZ
@given(data=st.data())
def test_truncated_recordings(capsys, tmp_path, small, data):
    n = data.draw(st.integers(0, len(small) - 1), label="cut at")
    feed(capsys, tmp_path, small[:n])


@FUZZ
@given(data=st.data())
def test_bit_flipped_recordings(capsys, tmp_path, small, data):
    buf = bytearray(small)
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(0, 7)), min_size=1, max_size=6),
                      label="flips")
    for pos, bit in flips:
        buf[pos] ^= 1 << bit
    feed(capsys, tmp_path, bytes(buf))


@FUZZ
@given(data=st.binary(max_size=2048))
def test_foreign_bytes(capsys, tmp_path, data):
    feed(capsys, tmp_path, data)


@FUZZ
@given(prefix=st.sampled_from([b"\xff\xff\xff\xff", b"ARROW1\x00\x00", b"PAR1", b"{\"kind\": ", b"\x00" * 8]),
       tail=st.binary(max_size=512))
def test_foreign_bytes_that_look_like_formats(capsys, tmp_path, prefix, tail):
    feed(capsys, tmp_path, prefix + tail)


def _arrow_stream(schema: pa.Schema, batch: pa.RecordBatch | None, fmt: str = "stream") -> bytes:
    sink = pa.BufferOutputStream()
    opener = pa.ipc.new_stream if fmt == "stream" else pa.ipc.new_file
    with opener(sink, schema) as w:
        if batch is not None:
            w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def test_foreign_arrow_files(capsys, tmp_path, small):
    from marlwatch.recording import METADATA_KEY, SCHEMA

    info = pa.ipc.open_stream(small).schema.metadata[METADATA_KEY]
    cases = {
        "other schema": _arrow_stream(pa.schema([("x", pa.int64())]), pa.record_batch({"x": [1]})),
        "arrow file format": _arrow_stream(SCHEMA.with_metadata({METADATA_KEY: info}), None, "file"),
        "our schema, bad metadata": _arrow_stream(SCHEMA.with_metadata({METADATA_KEY: b"{not json"}), None),
        "our schema, metadata of the wrong types": _arrow_stream(
            SCHEMA.with_metadata({METADATA_KEY: json.dumps({"algo": 3, "agents": "x", "procs": [1], "pinning": 5})}),
            pa.RecordBatch.from_pylist([{"kind": "span", "proc": 0, "name": "update", "t_ns": 1, "dur_ns": 2}],
                                       schema=SCHEMA)),
        "metadata is a list": _arrow_stream(SCHEMA.with_metadata({METADATA_KEY: b"[1, 2]"}), None),
        "columns of other types": _arrow_stream(
            pa.schema([(f.name, pa.string()) for f in SCHEMA]).with_metadata({METADATA_KEY: info}),
            pa.RecordBatch.from_pylist([{f.name: "1" for f in SCHEMA}],
                                       schema=pa.schema([(f.name, pa.string()) for f in SCHEMA]))),
        "only the schema": small[: len(_arrow_stream(SCHEMA.with_metadata({METADATA_KEY: info}), None)) - 8],
        "rows with impossible values": _arrow_stream(SCHEMA.with_metadata({METADATA_KEY: info}),
                                                     pa.RecordBatch.from_pylist([
                                                         {"kind": "span", "proc": -5, "name": None, "t_ns": -1,
                                                          "dur_ns": -10**15, "iter": -3},
                                                         {"kind": "core", "core": -1, "t_ns": 0, "value": float("nan")},
                                                         {"kind": "iter", "proc": 0, "t_ns": 5, "iter": None},
                                                         {"kind": "proc", "proc": 9, "name": "rss_bytes", "t_ns": 1},
                                                         {"kind": "event", "proc": 1, "name": "started", "t_ns": 1,
                                                          "text": "[not a dict"},
                                                         {"kind": "nonsense", "t_ns": 0},
                                                     ], schema=SCHEMA)),
    }
    for name, data in cases.items():
        try:
            feed(capsys, tmp_path, data)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign"])
def test_real_subprocess_gives_one_line_and_exit_2_or_reads(tmp_path, small, damage):
    data = {"truncated": small[:300], "flipped": bytes(b ^ 0xFF if 8 <= i < 64 else b for i, b in enumerate(small)),
            "foreign": b"PAR1" + bytes(range(256)) * 4}[damage]
    path = tmp_path / "bad.arrow"
    path.write_bytes(data)
    p = subprocess.run([sys.executable, "-m", "marlwatch", "summary", str(path)], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("marlwatch: ") and "Traceback" not in p.stderr


# -- malformed flag values of `run` ---------------------------------------------------------
# The safety net: should a value slip through as valid, the run still could not start (its
# recording path cannot be created), so the test can never launch a real run.
NET = ["--headless", "--record", "/proc/no-such-dir/x.arrow"]
INT_FLAGS = ["--agents", "--workers", "--iterations"]


def not_a_positive_int(s: str) -> bool:
    try:
        return int(s) < 1
    except ValueError:
        return True


def not_a_rate(s: str) -> bool:
    try:
        v = float(s)
    except ValueError:
        return True
    return not (0 < v <= 1000)


texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
# Random text is almost never a number: the values a range must refuse are drawn on purpose.
NON_FINITE = st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "1e400", "-1e400"])


def numbers_outside(low: float | None, high: float | None, *, low_open: bool = False,
                    whole: bool = True) -> st.SearchStrategy[str]:
    """Text of numbers outside [low, high] ((low, high] with low_open), just past each bound and
    far from it, and of what is not a number of that kind at all."""
    out: list[st.SearchStrategy[str]] = [NON_FINITE, texts.filter(lambda s: not _is_float(s))]
    if whole:
        out.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()).map(repr))
        if low is not None:
            out.append(st.integers(max_value=int(low) - (0 if low_open else 1)).map(str))
        if high is not None:
            out.append(st.integers(min_value=int(high) + 1).map(str))
    else:
        if low is not None:
            out.append(st.floats(max_value=low).filter(lambda x: x <= low if low_open else x < low).map(repr))
        if high is not None:
            out.append(st.floats(min_value=high, exclude_min=True).map(repr))
    return st.one_of(out)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@FUZZ
@given(flag=st.sampled_from(INT_FLAGS), value=st.one_of(texts.filter(not_a_positive_int), numbers_outside(1, None)))
def test_malformed_counts_are_rejected(capsys, flag, value):
    assert check(capsys, ["run", *NET, f"{flag}={value}"]) == 2


@FUZZ
@given(value=st.one_of(texts.filter(not_a_rate), numbers_outside(0, 1000, low_open=True, whole=False)))
def test_malformed_sample_rates_are_rejected(capsys, value):
    capsys.readouterr()
    assert main(["run", *NET, f"--sample-hz={value}"]) == 2
    assert "--sample-hz" in capsys.readouterr().err


@FUZZ
@given(value=numbers_outside(0, 2**32 - 1))
def test_malformed_seeds_are_rejected(capsys, value):
    capsys.readouterr()
    code = main(["run", *NET, f"--seed={value}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "cannot write recording" not in err, f"--seed {value!r} was accepted"


# What each setting means, written out here (not read from the rules under test): the values
# outside it must be refused. Every setting of every algorithm is listed (checked below).
WHOLE_FROM_1 = ["batch_size", "buffer_size", "max_cycles", "steps_per_iteration", "hidden", "episodes_per_iteration",
                "tom_every", "key_dim", "value_dim", "graph_width"]
WHOLE_FROM_0 = ["warmup", "prop_steps"]
POSITIVE = ["lr", "grad_clip", "reward_scale", "tom_lr_scale", "gumbel_tau"]
NOT_NEGATIVE = ["entropy_coef", "value_coef"]
FRACTIONS = ["gamma", "gae_lambda", "alpha"]  # [0, 1]
BOOLEANS = ["centralised_critic", "backprop_messages", "per_agent_loop"]
CHOICES = {"optimizer": ("adam", "rmsprop"), "graph": ("shared", "per_agent"), "comm_account": ("messages", "layer")}
FLAGS = ["env", "agents", "workers", "seed"]  # set by their own flags, never by --set
BOOL_WORDS = {"true", "false", "yes", "no", "1", "0"}


def _bad_values(name: str) -> st.SearchStrategy[str]:
    if name in WHOLE_FROM_1:
        return numbers_outside(1, None)
    if name in WHOLE_FROM_0:
        return numbers_outside(0, None)
    if name in POSITIVE:
        return numbers_outside(0, None, low_open=True, whole=False)
    if name in NOT_NEGATIVE:
        return numbers_outside(0, None, whole=False)
    if name in FRACTIONS:
        return numbers_outside(0, 1, whole=False)
    if name == "tau":
        return numbers_outside(0, 1, low_open=True, whole=False)
    if name in BOOLEANS:
        return st.one_of(st.sampled_from(["maybe", "2", "-1", "y", "truee", "on", ""]),
                         texts.filter(lambda s: s.strip().lower() not in BOOL_WORDS))
    if name in CHOICES:
        return texts.filter(lambda s: s.strip() not in CHOICES[name])
    assert name in FLAGS, f"{name}: a setting this test does not know the meaning of"
    return texts


def _settings() -> list[tuple[str, str]]:
    from algorithms import ALGORITHMS, make_config

    return [(algo, name) for algo in ALGORITHMS for name in make_config(algo).settings()]


def test_every_setting_has_a_meaning_here():
    """And every built-in setting declares its rule with setting() (a user's config may rely on
    the plain rule of the field's type)."""
    from algorithms import make_config
    from algorithms.configs import _rule

    for algo, name in _settings():
        _bad_values(name)
        assert _rule(type(make_config(algo)), name) is not None, f"{algo}: {name} has no setting() rule"


@FUZZ
@given(data=st.data())
def test_malformed_settings_are_rejected(capsys, data):
    algo, key = data.draw(st.sampled_from(_settings()), label="setting")
    setting = data.draw(st.one_of(
        texts.filter(lambda s: "=" not in s),  # no KEY=VALUE at all
        st.builds(lambda k, v: f"{k}={v}", texts.filter(lambda s: s.strip() not in _known_settings()), texts),
        _bad_values(key).map(lambda v: f"{key}={v}"),
    ), label="--set")
    capsys.readouterr()
    code = main(["run", *NET, "--algo", algo, "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "cannot write recording" not in err, f"--set {setting!r} was accepted"


@FUZZ
@given(data=st.data())
def test_settings_within_their_meaning_are_accepted(capsys, data):
    """The other side: values inside a setting's range pass the checks and reach the recording
    (which the safety net then refuses)."""
    from algorithms import make_config

    algo, key = data.draw(st.sampled_from([s for s in _settings() if s[1] not in FLAGS]), label="setting")
    kind = type(getattr(make_config(algo), key))
    if key in BOOLEANS:
        value = data.draw(st.sampled_from(sorted(BOOL_WORDS | {w.upper() for w in BOOL_WORDS})))
    elif key == "optimizer":
        value = data.draw(st.sampled_from(["adam", "rmsprop"]))
    elif kind is int:
        low = 1 if key in WHOLE_FROM_1 else 0
        # A buffer must hold the warm-up and a batch (2,048 and 1,024 by default).
        low, high = (25_600, 10**6) if key == "buffer_size" else (low, 1000 if key in ("warmup", "batch_size") else 64)
        value = str(data.draw(st.integers(low, high)))
    else:
        top = 1 if key in FRACTIONS or key == "tau" else 1e6
        x = data.draw(st.floats(0, top, exclude_min=key in POSITIVE or key == "tau"))
        value = repr(x)
    capsys.readouterr()
    code = main(["run", *NET, "--algo", algo, "--set", f"{key}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write recording" in err, f"--set {key}={value}: {err}"


def _known_settings() -> set[str]:
    from algorithms import ALGORITHMS, make_config

    return {name for algo in ALGORITHMS for name in make_config(algo).settings()}


@FUZZ
@given(name=texts.filter(lambda s: s not in _algorithms()))
def test_unknown_algorithms_are_rejected(capsys, name):
    assert check(capsys, ["run", *NET, f"--algo={name}"]) == 2


def _algorithms() -> set[str]:
    from algorithms import ALGORITHMS

    return set(ALGORITHMS)

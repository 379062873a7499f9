"""The command line's parser: every subcommand's arguments, and the types that check them.

Building it imports no command's code (no Textual, no torch, no runner): `marlwatch summary`
does not pay for the live app. A bad flag raises `UsageError` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

from marlwatch.app import REFRESH_HZ
from marlwatch.cli.errors import UsageError

# Subcommand -> (module of marlwatch.cli, its function, the help line).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("run", "cmd_run", "start a training run and watch it (default: MADDPG, 3 agents)"),
    "listen": ("run", "cmd_listen", "watch processes started elsewhere: they connect to this monitor"),
    "summary": ("files", "cmd_summary", "summarise a recording"),
    "algorithms": ("files", "cmd_algorithms", "list the built-in algorithms and their place in the taxonomy"),
    "replay": ("files", "cmd_replay", "open the live view on a recording: play, pause, seek"),
    "diff": ("files", "cmd_diff", "compare two recordings, with confidence intervals"),
    "export": ("files", "cmd_export", "export a recording to Perfetto/Chrome trace JSON, Parquet or CSV"),
    "flame": ("files", "cmd_flame", "flame graph of the py-spy samples taken while a phase ran"),
    "sweep": ("sweep", "cmd_sweep", "run an agents x workers grid and tabulate the scaling"),
    "report": ("sweep", "cmd_report", "make a sweep's report.html (plots) again from its recordings"),
    "repair": ("files", "cmd_repair", "rewrite a truncated recording from its complete batches"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# -- argument types ---------------------------------------------------------------------------
def positive_int(flag: str) -> Callable[[str], int]:
    """argparse type: a whole number >= 1, with a message naming `flag`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {value}")
        return value

    return parse


def positive_int_list(flag: str) -> Callable[[str], list[int]]:
    """argparse type: a comma-separated list of whole numbers >= 1 (sorted, without repeats)."""
    one = positive_int(flag)

    def parse(text: str) -> list[int]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{flag} takes a comma-separated list of whole numbers, got {text!r}")
        return sorted({one(t) for t in items})

    return parse


def setting(text: str) -> tuple[str, str]:
    """argparse type of --set: KEY=VALUE."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def latency_bound(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--latency-bound takes milliseconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--latency-bound must be a positive number of ms, got {text}")
    return value


def flame_request(text: str) -> tuple[str, float]:
    """`PHASE[:SECONDS]` of `marlwatch run --flame`."""
    from marlwatch.flame import DEFAULT_SECONDS, MAX_SECONDS

    phase, _, secs = text.partition(":")
    phase = phase.strip().strip("/")
    if not phase:
        raise argparse.ArgumentTypeError(f"expected PHASE[:SECONDS], got {text!r}")
    if not secs:
        return phase, DEFAULT_SECONDS
    try:
        seconds = float(secs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds must be a number, got {secs!r}") from None
    if not 0 < seconds <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"seconds must be in (0, {MAX_SECONDS}], got {secs}")
    return phase, seconds


def seconds_at(text: str) -> float:
    """argparse type of replay's --at: a finite number of seconds >= 0 (past the end means the end)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"--at takes a number of seconds >= 0, got {text!r}")
    return value


def replay_speed(text: str) -> float:
    from marlwatch.playback import SPEEDS

    value = math.inf if text.strip().lower() in ("max", "inf") else None
    if value is None:
        try:
            value = float(text.strip().rstrip("xX"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--speed takes 1, 4, 16 or max, got {text!r}") from None
    if value not in SPEEDS:
        raise argparse.ArgumentTypeError(f"--speed takes 1, 4, 16 or max, got {text!r}")
    return value


# -- the subcommands' arguments ---------------------------------------------------------------
def _watch_arguments(p: argparse.ArgumentParser) -> None:
    """What every monitor takes, whatever started the processes it watches."""
    p.add_argument("--record", default=None,
                   help="recording path (default: a new runs/NAME-TIME.arrow); an existing file is refused")
    p.add_argument("--force", action="store_true", help="let --record overwrite an existing file")
    p.add_argument("--headless", action="store_true", help="no terminal UI: a progress line and a summary")
    p.add_argument("--json", action="store_true", help="headless: print the final summary as JSON")
    p.add_argument("--sample-hz", type=float, default=10.0,
                   help="per-core sampling rate (Hz; per-process CPU and memory: at most 2 Hz)")
    p.add_argument("--refresh", type=float, default=REFRESH_HZ, metavar="HZ",
                   help=f"live view: redraws per second (default {REFRESH_HZ:g}; lower costs the run less CPU)")
    p.add_argument("--latency-bound", type=latency_bound, default=None, metavar="MS",
                   help="also show latency-bounded IPS: only iterations that took at most MS ms count")


def _run(run: argparse.ArgumentParser) -> None:
    from marlwatch.flame import DEFAULT_RATE

    builtin = run.add_argument_group("built-in algorithms (not with a COMMAND)")
    builtin.add_argument("--algo", default=None, help="algorithm (see `marlwatch algorithms`; default maddpg)")
    builtin.add_argument("--env", default=None, help="environment (default: the algorithm's)")
    builtin.add_argument("--agents", type=positive_int("--agents"), default=None, help="agents (default 3)")
    builtin.add_argument("--workers", type=positive_int("--workers"), default=None,
                         help="rollout worker processes (default: one per core)")
    builtin.add_argument("--iterations", type=positive_int("--iterations"), default=None,
                         help="stop after this many learner iterations (default: 500 headless, until q live)")
    builtin.add_argument("--seed", type=int, default=None)
    builtin.add_argument("--keep-going", action="store_true", default=None,
                         help="a crashed worker does not stop the run")
    builtin.add_argument("--ignore-limits", action="store_true", default=None,
                         help="run even if it needs more memory than is available or more than 4 workers per core")
    builtin.add_argument("--set", dest="settings", type=setting, action="append", default=None,
                         metavar="KEY=VALUE", help="algorithm setting, e.g. --set batch_size=512")
    builtin.add_argument("--backend", choices=("local", "ray"), default=None,
                         help="local processes (default), or rollout workers as Ray actors (docs/distributed.md)")
    builtin.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                         help="with --backend ray: the Ray cluster to run on (default: start one on this machine)")
    run.add_argument("--no-auto-phases", dest="auto_phases", action="store_false",
                     help="with a COMMAND: no hooks in its processes; only your own spans are recorded")
    _watch_arguments(run)
    run.add_argument("--no-spans", dest="spans", action="store_false",
                     help="record no spans (iterations still counted): measure the overhead yourself")
    run.add_argument("--flame", type=flame_request, action="append", default=[], metavar="PHASE[:SECONDS]",
                     help="run py-spy on the processes running PHASE for SECONDS (default 5) once it runs; "
                          "samples are stored in the recording (see `marlwatch flame`)")
    run.add_argument("--auto-flame", action="store_true",
                     help="run py-spy once, when a phase becomes the hottest or its p95 jumps")
    run.add_argument("--flame-rate", type=positive_int("--flame-rate"), default=DEFAULT_RATE, metavar="HZ",
                     help=f"py-spy samples per second (default {DEFAULT_RATE})")


def _listen(listen: argparse.ArgumentParser) -> None:
    listen.add_argument("--address", default=None, metavar="HOST:PORT|unix:PATH",
                        help="where to listen (default: a Unix socket in a private temporary folder)")
    listen.add_argument("--allow-remote", action="store_true",
                        help="allow an --address other machines can reach (the key is still required)")
    _watch_arguments(listen)


def _summary(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--latency-bound", type=latency_bound, default=None, metavar="MS",
                   help="IPS counting only iterations that took at most MS ms, and the fraction that did")
    p.add_argument("--exact", action="store_true",
                   help="read every span instead of the recording's aggregates: exact phase percentiles "
                        "(else within 1.1%%); slower on long recordings")


def _replay(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a recording (.arrow) written by `marlwatch run`")
    p.add_argument("--speed", type=replay_speed, default=1.0, help="1, 4, 16 or max (default 1)")
    p.add_argument("--at", type=seconds_at, default=None, metavar="SECONDS",
                   help="start with the playhead this many seconds into the recording")
    p.add_argument("--paused", action="store_true", help="start paused")


def _diff(p: argparse.ArgumentParser) -> None:
    from marlwatch.diff import MIN_CHANGE_PCT, RESAMPLES

    p.add_argument("a", metavar="A.arrow", help="the baseline recording")
    p.add_argument("b", metavar="B.arrow", help="the recording compared with it")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--fail-if-slower", type=float, default=None, metavar="PCT",
                   help="exit 1 when B's IPS is lower than A's by more than PCT percent with confidence")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="also leave out the N iterations after the first (the first, start-up, is never compared)")
    p.add_argument("--min-change", type=float, default=MIN_CHANGE_PCT, metavar="PCT",
                   help=f"smallest change (percent of A's value) given a verdict (default {MIN_CHANGE_PCT:g})")
    p.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (results are reproducible)")
    p.add_argument("--exact", action="store_true",
                   help="read every span instead of the recordings' aggregates (the same figures, slower)")


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the recording")
    p.add_argument("--to", required=True, choices=("perfetto", "parquet", "csv"),
                   help="perfetto: Chrome trace JSON (ui.perfetto.dev, chrome://tracing); "
                        "parquet/csv: span and counter tables")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="perfetto: the .json file; parquet/csv: a directory (created) for the tables")


def _flame(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a recording with py-spy samples (marlwatch run --flame PHASE)")
    p.add_argument("--phase", required=True, help="phase path; its sub-phases are included (update -> update/*)")
    p.add_argument("--to", choices=("text", "speedscope", "svg"), default="text",
                   help="text: top functions; speedscope: JSON for speedscope.app; svg: a flame graph")
    p.add_argument("-o", "--out", default=None, help="output file (default: stdout)")
    p.add_argument("--top", type=int, default=25, metavar="N", help="text: number of functions (default 25)")
    p.add_argument("--lines", action="store_true",
                   help="one frame per source line (default: one per function, as py-spy's --nolineno)")


def _sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algo", required=True, help="algorithm (see `marlwatch algorithms`)")
    p.add_argument("--env", default="", help="environment (default: the algorithm's)")
    p.add_argument("--agents", type=positive_int_list("--agents"), default=[2, 4, 8], help="e.g. 2,4,8,16")
    p.add_argument("--workers", type=positive_int_list("--workers"), default=[1], help="e.g. 1,2")
    p.add_argument("--iterations", type=positive_int("--iterations"), default=50, help="learner iterations per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="folder for the recordings and tables (default: a new runs/sweep-ALGO-TIME)")
    p.add_argument("--force", action="store_true", help="overwrite recordings an earlier sweep left in --out")
    p.add_argument("--ignore-limits", action="store_true",
                   help="run cells that need more memory than is available or more than 4 workers per core")
    p.add_argument("--set", dest="settings", type=setting, action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm setting for every cell, e.g. --set max_cycles=25")
    p.add_argument("--latency-bound", type=latency_bound, default=None, metavar="MS",
                   help="per agent count, the worker count with the highest IPS whose p99 iteration "
                        "latency is at most MS ms (latency-bounded throughput)")
    p.add_argument("--report", action="store_true",
                   help="also write report.html (plots, needs the `report` extra: matplotlib) into the folder")
    p.add_argument("--no-plots", action="store_true", help="no terminal plots after the table")


def _report(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a sweep's folder (its recordings: *.arrow)")
    p.add_argument("--latency-bound", type=latency_bound, default=None, metavar="MS",
                   help="the bound of the latency-bounded choice (default: the one the recordings carry)")
    p.add_argument("-o", "--output", default=None, help="output file (default: FOLDER/report.html)")


def _repair(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the recording to repair")
    p.add_argument("-o", "--output", default=None,
                   help="where to write the repaired recording (default: FILE with .repaired.arrow)")


_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "run": _run, "listen": _listen, "summary": _summary, "algorithms": lambda p: None, "replay": _replay,
    "diff": _diff, "export": _export, "flame": _flame, "sweep": _sweep, "report": _report, "repair": _repair,
}
_RUN_USAGE = dict(usage="marlwatch run [options] [-- COMMAND [ARGS...]]",
                  description="Watch a built-in algorithm, or your own command: marlwatch run -- python train.py")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="marlwatch", description="See where the time of a MARL training run goes.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    for name, (_, _, help_text) in COMMANDS.items():
        _ARGUMENTS[name](sub.add_parser(name, help=help_text, **(_RUN_USAGE if name == "run" else {})))
    return p

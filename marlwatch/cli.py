"""The `marlwatch` command.

Exit codes: 0 done; 1 the run failed (a process crashed, the recording could not be written);
2 bad input (flags, files); 130 stopped by Ctrl-C or SIGTERM (the recording is complete).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

from marlwatch.outputs import OutputError
from marlwatch.terminal import finite, printable, say

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# Subcommands that live in their own module: each has `add_arguments(parser)` and `cli(args) -> int`
# and raises `UsageError` for bad input.
PLUGGED: dict[str, tuple[str, str]] = {
    "replay": ("marlwatch.app.replay", "open the live view on a recording: play, pause, seek"),
    "diff": ("marlwatch.diff", "compare two recordings, with confidence intervals"),
    "export": ("marlwatch.export", "export a recording to Perfetto/Chrome trace JSON, Parquet or CSV"),
    "flame": ("marlwatch.flame", "flame graph of the py-spy samples taken while a phase ran"),
    "sweep": ("marlwatch.sweep", "run an agents x workers grid and tabulate the scaling"),
    "repair": ("marlwatch.repair", "rewrite a truncated recording from its complete batches"),
}


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class RunFailed(Exception):
    """A run that failed, before or while running: printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


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


def _setting(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def _latency_bound(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--latency-bound takes milliseconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--latency-bound must be a positive number of ms, got {text}")
    return value


def _flame(text: str) -> tuple[str, float]:
    from marlwatch.flame import parse_flame_arg

    return parse_flame_arg(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="marlwatch", description="See where the time of a MARL training run goes.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="start a training run and watch it (default: MADDPG, 3 agents)")
    run.add_argument("--algo", default="maddpg", help="algorithm (see `marlwatch algorithms`)")
    run.add_argument("--env", default="", help="environment (default: the algorithm's)")
    run.add_argument("--agents", type=positive_int("--agents"), default=3)
    run.add_argument("--workers", type=positive_int("--workers"), default=None,
                     help="rollout worker processes (default: one per core)")
    run.add_argument("--iterations", type=positive_int("--iterations"), default=None,
                     help="stop after this many learner iterations (default: 500 headless, until q live)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--record", default=None,
                     help="recording path (default: a new runs/ALGO-TIME.arrow); an existing file is refused")
    run.add_argument("--force", action="store_true", help="let --record overwrite an existing file")
    run.add_argument("--ignore-limits", action="store_true",
                     help="run even if it needs more memory than is available or more than 4 workers per core")
    run.add_argument("--headless", action="store_true", help="no terminal UI: a progress line and a summary")
    run.add_argument("--no-spans", dest="spans", action="store_false",
                     help="record no spans (iterations still counted): measure the overhead yourself")
    run.add_argument("--keep-going", action="store_true", help="a crashed worker does not stop the run")
    run.add_argument("--sample-hz", type=float, default=10.0, help="core/process sampling rate")
    run.add_argument("--set", dest="settings", type=_setting, action="append", default=[],
                     metavar="KEY=VALUE", help="algorithm setting, e.g. --set batch_size=512")
    run.add_argument("--json", action="store_true", help="headless: print the final summary as JSON")
    run.add_argument("--refresh", type=float, default=4.0, metavar="HZ",
                     help="live view: redraws per second (default 4; lower costs the run less CPU)")
    run.add_argument("--latency-bound", type=_latency_bound, default=None, metavar="MS",
                     help="also show latency-bounded IPS: only iterations that took at most MS ms count")
    run.add_argument("--flame", type=_flame, action="append", default=[], metavar="PHASE[:SECONDS]",
                     help="run py-spy on the processes running PHASE for SECONDS (default 5) once it runs; "
                          "samples are stored in the recording (see `marlwatch flame`)")
    run.add_argument("--auto-flame", action="store_true",
                     help="run py-spy once, when a phase becomes the hottest or its p95 jumps")
    run.add_argument("--flame-rate", type=positive_int("--flame-rate"), default=100, metavar="HZ",
                     help="py-spy samples per second (default 100)")

    summ = sub.add_parser("summary", help="summarise a recording")
    summ.add_argument("file")
    summ.add_argument("--json", action="store_true", help="print a JSON object")
    summ.add_argument("--latency-bound", type=_latency_bound, default=None, metavar="MS",
                      help="IPS counting only iterations that took at most MS ms, and the fraction that did")

    sub.add_parser("algorithms", help="list the built-in algorithms and their place in the taxonomy")

    for name, (module, help_text) in PLUGGED.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise
            continue  # that feature is not built yet
        mod.add_arguments(sub.add_parser(name, help=help_text))
    return p


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    say(message)  # made printable: messages name files and quote what was in them
    return code


class StdoutError(OSError):
    """Standard output does not take what a command prints (a full disk, an I/O error). An
    OSError, so that a command writing its output there (`export -o -`) reports it as it
    reports any failed write."""


class _GuardedStdout:
    """sys.stdout while a command runs: a write or flush that fails raises StdoutError, which
    main() turns into one line, instead of an OSError traceback from whichever print() hit it (or
    from the interpreter's last flush, after main() has returned)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _guard(self, method: str, *args: object) -> object:
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise  # a reader that left (`| head`): not a failure, see _main
        except OSError as e:
            raise StdoutError(e.errno, e.strerror or str(e)) from None

    def write(self, text: str) -> int:
        return self._guard("write", text)  # type: ignore[return-value]

    def flush(self) -> None:
        self._guard("flush")

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _stdout_to_devnull() -> None:
    # What is still buffered for stdout would fail again when the interpreter flushes it on exit
    # (a traceback-like "Exception ignored" after our line): stdout goes to /dev/null from here on.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    real_stdout = sys.stdout
    sys.stdout = _GuardedStdout(real_stdout)  # type: ignore[assignment]
    try:
        code = _main(argv)
        sys.stdout.flush()  # a full disk shows here, while we can still say so in one line
        return code
    except KeyboardInterrupt:
        # Ctrl-C before a command installed its own handler (`run` does, before it starts any
        # process): still importing torch or reading a file, nothing started, nothing to keep.
        return _fail("interrupted", EXIT_INTERRUPTED)
    except StdoutError as e:
        sys.stdout = real_stdout
        _stdout_to_devnull()
        return _fail(f"cannot write to standard output: {e.strerror}", EXIT_FAILED)
    finally:
        sys.stdout = real_stdout


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(str(e))
    if args.command is None:
        args = build_parser().parse_args(["run", *(argv or [])])
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "summary":
            return cmd_summary(args)
        if args.command == "algorithms":
            return cmd_algorithms()
        if args.command in PLUGGED:
            return importlib.import_module(PLUGGED[args.command][0]).cli(args)
    except (UsageError, OutputError) as e:
        return _fail(str(e))
    except RunFailed as e:
        return _fail(f"run failed: {e}", EXIT_FAILED)
    except BrokenPipeError:
        _stdout_to_devnull()  # output piped into `head`, which has read what it wanted
        return EXIT_OK
    return _fail(f"unknown command {args.command!r}")


# -- run ------------------------------------------------------------------------------------
def _run_config(args: argparse.Namespace, default_iterations: int | None):
    from marlwatch.runner import RunConfig

    if not 0 < args.sample_hz <= 1000:  # also NaN, which every comparison lets through
        raise UsageError(f"--sample-hz must be in (0, 1000], got {args.sample_hz}")
    return RunConfig(
        algo=args.algo, env=args.env, agents=args.agents, workers=args.workers or 0,
        iterations=args.iterations if args.iterations is not None else default_iterations,
        seed=args.seed, spans=args.spans, record=args.record, overwrite=args.force, keep_going=args.keep_going,
        ignore_limits=args.ignore_limits,
        sample_hz=args.sample_hz, settings=dict(args.settings),
    )


def make_run(args: argparse.Namespace, default_iterations: int | None):
    """Build (not start) a Run, turning every configuration problem into a UsageError."""
    from marlwatch.runner import Run

    cfg = _run_config(args, default_iterations)
    try:
        run = Run(cfg)
    except (KeyError, ValueError) as e:
        raise UsageError(str(e).strip("'\"")) from None
    if getattr(args, "latency_bound", None) is not None:
        # In the run info, so every Metrics of this run (live, replay, summary) shows it.
        run.info.extra["latency_bound_ms"] = args.latency_bound
    from marlwatch.flame import attach

    run.flame = attach(run, args)  # None unless --flame / --auto-flame; the live app uses it too
    return run


def start_run(run) -> None:
    from marlwatch.recording import RecordingError, RecordingExists
    from marlwatch.runner import RunError

    try:
        run.start()
    except RecordingExists as e:
        raise UsageError(f"{e} (--force overwrites it)") from None
    except RecordingError as e:
        raise UsageError(str(e)) from None
    except RunError as e:  # its processes could not all be started: none is left
        raise RunFailed(str(e)) from None


def cmd_run(args: argparse.Namespace) -> int:
    if not args.headless:
        from marlwatch.app.live import run_live

        return run_live(args)
    return run_headless(args)


def run_headless(args: argparse.Namespace) -> int:
    from marlwatch.metrics import Metrics
    from marlwatch.report import plural, progress_line, summary_text

    run = make_run(args, default_iterations=500)
    metrics = Metrics(run.info)
    if run.flame is not None:
        nl = "\n" if sys.stderr.isatty() else ""  # after the progress line
        run.flame.on_message = lambda text: print(f"{nl}marlwatch: {printable(text)}", file=sys.stderr)
    run.listeners.append(metrics.add)
    interrupted = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted == 1:
            run.request_stop("stopped by " + signal.Signals(signum).name)
            print(f"\nmarlwatch: stopping (recording to {run.record_path}); press Ctrl-C again to force",
                  file=sys.stderr)
        else:
            raise KeyboardInterrupt

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    tty = sys.stderr.isatty()
    start_run(run)
    say(f"{run.cfg.algo} on {run.info.env}, {plural(run.cfg.agents, 'agent')}, {plural(run.workers, 'worker')}; "
        f"recording to {run.record_path}")
    try:
        next_line = time.monotonic() + 1.0
        while run.alive:
            run.pump(0.2)
            if time.monotonic() >= next_line:
                line = progress_line(metrics.snapshot(), run.cfg.iterations, run.recording_bytes)
                print(("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", file=sys.stderr,
                      flush=True)
                next_line = time.monotonic() + (1.0 if tty else 5.0)
        run.finish()
    except KeyboardInterrupt:
        run.kill_children()
        if run.writer is not None:
            run.writer.close(t_ns=run.now_ns(), detail={"stop_reason": "forced"})
        print(file=sys.stderr)
        return _fail(f"forced stop; recording kept up to now in {run.record_path}", EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if tty:
        print(file=sys.stderr)
    snap = metrics.snapshot()
    if args.json:
        print(json.dumps(finite(snap.to_json()), indent=2, default=str, allow_nan=False))
    else:
        print(summary_text(snap, str(run.record_path), "complete" if snap.complete else "truncated"))
    if run.failure:
        return _fail(f"run failed: {run.failure} (recording kept: {run.record_path})", EXIT_FAILED)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK


# -- summary --------------------------------------------------------------------------------
def open_or_fail(path: str):
    from marlwatch.recording import RecordingError, open_recording

    try:
        return open_recording(path)
    except RecordingError as e:
        raise UsageError(str(e)) from None


def warn_skipped(rec, also: str | None = None) -> None:
    """The one warning line about `rec`: `also` (another thing to say about the file, such as
    "is truncated: ..."), then what the reader left out of it (rows, batches, metadata)."""
    line = f"{rec.path} {also}" if also else f"{rec.path}:"
    if rec.skipped:
        line += ("; " if also else " ") + rec.skipped.describe() + "; the figures leave them out"
    if also or rec.skipped:
        say(line, warning=True)


def cmd_summary(args: argparse.Namespace) -> int:
    from marlwatch.metrics import summarize
    from marlwatch.recording import RecordingError
    from marlwatch.report import summary_text

    rec = open_or_fail(args.file)
    if args.latency_bound is not None:
        rec.info.extra["latency_bound_ms"] = args.latency_bound
    try:
        snap = summarize(rec)
    except RecordingError as e:  # nothing valid in it
        raise UsageError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a damaged file must give one line, not a traceback
        raise UsageError(f"{args.file}: damaged recording ({type(e).__name__}: {e})") from None
    if args.json:
        out = snap.to_json()
        out["status"] = rec.status
        print(json.dumps(finite(out), indent=2, default=str, allow_nan=False))
    else:
        print(summary_text(snap, args.file, rec.status))
    truncated = None
    if not rec.complete and rec.batches_read == 0 and not rec.truncated_mid_batch:
        truncated = "is truncated: it holds the run's settings but no rows (the monitor stopped before its first write)"
    elif not rec.complete:
        lost = " (the last batch was cut mid-write and is lost)" if rec.truncated_mid_batch else ""
        truncated = f"is truncated: no end-of-run marker{lost}; read {rec.batches_read} complete batches"
    warn_skipped(rec, truncated)
    return EXIT_OK


def cmd_algorithms() -> int:
    from algorithms import ALGORITHMS

    print(f"{'name':<13} {'training':<14} {'communication':<18} {'default env':<15} what is communicated")
    for s in ALGORITHMS.values():
        print(f"{s.name:<13} {s.training:<14} {s.communication:<18} {s.default_env:<15} {s.description}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The `marlwatch` command.

Exit codes: 0 done; 1 the run failed (a process crashed, the recording could not be written);
2 bad input (flags, files); 130 stopped by Ctrl-C or SIGTERM (the recording is complete).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
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
    "report": ("marlwatch.sweep_report", "make a sweep's report.html (plots) again from its recordings"),
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


def _add_watch_arguments(p: argparse.ArgumentParser) -> None:
    """What every monitor takes, whatever started the processes it watches."""
    p.add_argument("--record", default=None,
                   help="recording path (default: a new runs/NAME-TIME.arrow); an existing file is refused")
    p.add_argument("--force", action="store_true", help="let --record overwrite an existing file")
    p.add_argument("--headless", action="store_true", help="no terminal UI: a progress line and a summary")
    p.add_argument("--json", action="store_true", help="headless: print the final summary as JSON")
    p.add_argument("--sample-hz", type=float, default=10.0, help="core/process sampling rate")
    p.add_argument("--refresh", type=float, default=4.0, metavar="HZ",
                   help="live view: redraws per second (default 4; lower costs the run less CPU)")
    p.add_argument("--latency-bound", type=_latency_bound, default=None, metavar="MS",
                   help="also show latency-bounded IPS: only iterations that took at most MS ms count")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand's module is imported for its options (the
    others are listed, bare): `summary` of a recording then never imports Textual or torch."""
    p = _Parser(prog="marlwatch", description="See where the time of a MARL training run goes.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="start a training run and watch it (default: MADDPG, 3 agents)",
                         usage="marlwatch run [options] [-- COMMAND [ARGS...]]",
                         description="Watch a built-in algorithm, or your own command: marlwatch run -- python train.py")
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
    builtin.add_argument("--set", dest="settings", type=_setting, action="append", default=None,
                         metavar="KEY=VALUE", help="algorithm setting, e.g. --set batch_size=512")
    builtin.add_argument("--backend", choices=("local", "ray"), default=None,
                         help="local processes (default), or rollout workers as Ray actors (docs/distributed.md)")
    builtin.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                         help="with --backend ray: the Ray cluster to run on (default: start one on this machine)")
    run.add_argument("--no-auto-phases", dest="auto_phases", action="store_false",
                     help="with a COMMAND: no hooks in its processes; only your own spans are recorded")
    _add_watch_arguments(run)
    run.add_argument("--no-spans", dest="spans", action="store_false",
                     help="record no spans (iterations still counted): measure the overhead yourself")
    run.add_argument("--flame", type=_flame, action="append", default=[], metavar="PHASE[:SECONDS]",
                     help="run py-spy on the processes running PHASE for SECONDS (default 5) once it runs; "
                          "samples are stored in the recording (see `marlwatch flame`)")
    run.add_argument("--auto-flame", action="store_true",
                     help="run py-spy once, when a phase becomes the hottest or its p95 jumps")
    run.add_argument("--flame-rate", type=positive_int("--flame-rate"), default=100, metavar="HZ",
                     help="py-spy samples per second (default 100)")

    listen = sub.add_parser("listen", help="watch processes started elsewhere: they connect to this monitor")
    listen.add_argument("--address", default=None, metavar="HOST:PORT|unix:PATH",
                        help="where to listen (default: a Unix socket in a private temporary folder)")
    listen.add_argument("--allow-remote", action="store_true",
                        help="allow an --address other machines can reach (the key is still required)")
    _add_watch_arguments(listen)

    summ = sub.add_parser("summary", help="summarise a recording")
    summ.add_argument("file")
    summ.add_argument("--json", action="store_true", help="print a JSON object")
    summ.add_argument("--latency-bound", type=_latency_bound, default=None, metavar="MS",
                      help="IPS counting only iterations that took at most MS ms, and the fraction that did")
    summ.add_argument("--exact", action="store_true",
                      help="read every span instead of the recording's aggregates: exact phase percentiles "
                           "(else within 1.1%%); slower on long recordings")

    sub.add_parser("algorithms", help="list the built-in algorithms and their place in the taxonomy")

    for name, (module, help_text) in PLUGGED.items():
        if command is not None and command != name:
            sub.add_parser(name, help=help_text)
            continue
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


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`marlwatch [run] [options] -- COMMAND ...`: marlwatch's own arguments, and the user's command.
    For other subcommands `--` keeps its usual meaning (the end of options)."""
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    subcommand = next((a for a in argv[:i] if not a.startswith("-")), "run")
    if subcommand != "run":
        return argv, None
    return argv[:i], argv[i + 1:]


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, user_command = _split_command(argv)
    try:
        args = build_parser(own[0] if own and not own[0].startswith("-") else None).parse_args(own)
        if args.command is None:
            args = build_parser("run").parse_args(["run", *own])
    except UsageError as e:
        return _fail(str(e))
    args.user_command = user_command
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "listen":
            return cmd_listen(args)
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
_BUILTIN_ONLY = {"algo": "--algo", "env": "--env", "agents": "--agents", "workers": "--workers",
                 "iterations": "--iterations", "seed": "--seed", "keep_going": "--keep-going", "settings": "--set",
                 "ignore_limits": "--ignore-limits", "backend": "--backend", "ray_address": "--ray-address"}


def _run_config(args: argparse.Namespace, default_iterations: int | None):
    from marlwatch.runner import RunConfig

    if not 0 < args.sample_hz <= 1000:  # also NaN, which every comparison lets through
        raise UsageError(f"--sample-hz must be in (0, 1000], got {args.sample_hz}")
    common = dict(spans=getattr(args, "spans", True), record=args.record, overwrite=args.force,
                  sample_hz=args.sample_hz)
    if args.command == "listen":
        return RunConfig(listen=_listen_address(args), **common)
    command = getattr(args, "user_command", None)
    if command is not None:
        given = [flag for key, flag in _BUILTIN_ONLY.items() if getattr(args, key, None) not in (None, [])]
        if given:
            raise UsageError(f"{', '.join(given)}: for the built-in algorithms, not with a command after --")
        if not command:
            raise UsageError("no command after --: marlwatch run -- python train.py")
        return RunConfig(command=command, auto_phases=args.auto_phases, **common)
    backend = args.backend or "local"
    if args.ray_address is not None:
        if backend != "ray":
            raise UsageError("--ray-address goes with --backend ray")
        if not args.ray_address.strip():
            raise UsageError("--ray-address takes auto or HOST:PORT")
    return RunConfig(
        algo=args.algo or "maddpg", env=args.env or "", agents=args.agents or 3, workers=args.workers or 0,
        iterations=args.iterations if args.iterations is not None else default_iterations,
        seed=args.seed or 0, keep_going=bool(args.keep_going), ignore_limits=bool(args.ignore_limits),
        settings=dict(args.settings or []), backend=backend, ray_address=args.ray_address, **common,
    )


def _listen_address(args: argparse.Namespace) -> str:
    from marlwatch.monitor import Address
    from marlwatch.runner import PRIVATE_SOCKET

    if args.address is None:
        return PRIVATE_SOCKET
    try:
        address = Address(args.address)
    except ValueError as e:
        raise UsageError(f"--address: {e}") from None
    if not address.is_local and not args.allow_remote:
        raise UsageError(f"--address {args.address} can be reached from other machines: add --allow-remote "
                         "(connections still need the key)")
    return args.address


def make_run(args: argparse.Namespace, default_iterations: int | None, *, command_log: bool = False):
    """Build (not start) a Run, turning every configuration problem into a UsageError.
    `command_log`: a command's output goes to a log beside the recording (the live app owns the terminal)."""
    from marlwatch.launchers import LaunchError
    from marlwatch.runner import Run

    cfg = _run_config(args, default_iterations)
    cfg.command_log = command_log and cfg.command is not None
    try:
        run = Run(cfg)
    except (KeyError, ValueError, LaunchError) as e:
        raise UsageError(str(e).strip("'\"")) from None
    if getattr(args, "latency_bound", None) is not None:
        # In the run info, so every Metrics of this run (live, replay, summary) shows it.
        run.info.extra["latency_bound_ms"] = args.latency_bound
    return run


def make_flame(run, args: argparse.Namespace, *, always: bool = False):
    """The py-spy controller of `run`: when --flame / --auto-flame asked for one, or `always` (the
    live app's `f` key needs one)."""
    from marlwatch.flame import FlameController, attach

    flame = attach(run, args)
    if flame is None and always:
        flame = FlameController(run)
    return flame


def start_run(run) -> None:
    """Start `run`: bad paths and commands are usage errors (exit 2); processes that cannot be
    created fail the run (exit 1) with what was recorded kept."""
    from marlwatch.launchers import LaunchError
    from marlwatch.recording import RecordingError, RecordingExists
    from marlwatch.runner import RunError

    try:
        run.start()
    except RecordingExists as e:
        raise UsageError(f"{e} (--force overwrites it)") from None
    except (RecordingError, LaunchError) as e:
        raise UsageError(str(e)) from None
    except RunError as e:  # its processes could not all be started: none is left
        raise RunFailed(str(e)) from None


def cmd_run(args: argparse.Namespace) -> int:
    if not args.headless:
        from marlwatch.app.live import run_live

        return run_live(args)
    return run_headless(args)


def cmd_listen(args: argparse.Namespace) -> int:
    return cmd_run(args)


def run_headless(args: argparse.Namespace) -> int:
    from marlwatch.metrics import Metrics
    from marlwatch.report import progress_line, summary_text
    from marlwatch.runner import drive, stop_on_signals

    run = make_run(args, default_iterations=500)
    flame = make_flame(run, args)
    metrics = Metrics(run.info)
    tty = sys.stderr.isatty() and run.cfg.command is None  # a command's own output shares the terminal
    if flame is not None:
        nl = "\n" if tty else ""  # after the progress line
        flame.on_message = lambda text: say(f"{nl}{text}")
    run.listeners.append(metrics.add)

    def on_first_signal(signum: int) -> None:
        print(file=sys.stderr)
        say(f"stopping (recording to {run.record_path}); press Ctrl-C again to force")

    def progress() -> None:
        line = progress_line(metrics.snapshot(), run.cfg.iterations if run.cfg.command is None else None,
                             run.recording_bytes)
        print(("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    with stop_on_signals(run, on_first_signal):
        try:
            start_run(run)
            say(f"{run.describe()}; recording to {run.record_path}")
            if run.cfg.listen is not None:
                _print_exports(run)
            drive(run, every=progress, period_s=1.0 if tty else (10.0 if run.cfg.command else 5.0))
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return _fail(f"forced stop; recording kept up to now in {run.record_path}", EXIT_INTERRUPTED)
    if tty:
        print(file=sys.stderr)
    snap = metrics.snapshot()
    if args.json:
        print(json.dumps(finite(snap.to_json()), indent=2, default=str, allow_nan=False))
    else:
        print(summary_text(snap, str(run.record_path), "complete" if snap.complete else "truncated"))
    return finish_message(run, snap)


def _print_exports(run) -> None:
    """What a user pastes into the shell that starts the processes to watch (stdout: scriptable)."""
    print(f"export MARLWATCH_ADDRESS={run.monitor.address}")
    print(f"export MARLWATCH_AUTHKEY={run.monitor.authkey.hex()}", flush=True)


def finish_message(run, snap) -> int:
    """The last lines after a run, and marlwatch's exit code: the command's own for a command
    (a command that fails is not a marlwatch failure), 1 for a failed run, 128+N after signal N."""
    from marlwatch.runner import signal_exit_code

    command = run.cfg.command is not None
    if (command or run.cfg.listen is not None) and not snap.phases:
        if not command:
            why = "no process connected with the key"
        elif run.cfg.auto_phases:
            why = "the command's processes never connected (is it a Python program?)"
        else:
            why = "the command never used marlwatch's span API (auto phases were off: --no-auto-phases)"
        say(f"no spans arrived: {why}")
    if command:
        if run.stop_signal is not None:
            return signal_exit_code(run.stop_signal)
        if run.launcher.stopped_by_us:  # q in the live app: the command's death by our SIGINT is the stop
            return EXIT_OK
        code = run.launcher.exit_code
        if code not in (None, 0):
            tail = run.launcher.output_tail()
            if tail:
                print("marlwatch: the command's last output:\n  "
                      + "\n  ".join(printable(line) for line in tail), file=sys.stderr)
            say(f"the command {run.describe()} exited with code {code} (recording kept: {run.record_path})")
        return code or EXIT_OK
    if run.failure:
        return _fail(f"run failed: {run.failure} (recording kept: {run.record_path})", EXIT_FAILED)
    if run.stop_signal is not None:
        return signal_exit_code(run.stop_signal)
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
        snap = summarize(rec, exact=args.exact)
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

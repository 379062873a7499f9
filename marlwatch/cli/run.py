"""`marlwatch run` and `marlwatch listen`: build a Run from the arguments, drive it headless or
in the live app, and turn how it ended into the last lines and the exit code."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from marlwatch.cli.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    RunFailed,
    UsageError,
    fail,
    signal_exit_code,
)
from marlwatch.terminal import finite, printable, say, to_devnull

if TYPE_CHECKING:
    from marlwatch.flame.controller import FlameController
    from marlwatch.metrics import Snapshot
    from marlwatch.runner import Run, RunConfig

# Flags of the built-in algorithms, refused with a command after `--`.
_BUILTIN_ONLY = {"algo": "--algo", "env": "--env", "agents": "--agents", "workers": "--workers",
                 "iterations": "--iterations", "seed": "--seed", "keep_going": "--keep-going", "settings": "--set",
                 "ignore_limits": "--ignore-limits", "backend": "--backend", "ray_address": "--ray-address"}


def run_config(args: argparse.Namespace, default_iterations: int | None) -> RunConfig:
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


def build_run(cfg: RunConfig) -> Run:
    """A Run for `cfg` (not started); every configuration problem is a UsageError."""
    from marlwatch.launchers import LaunchError
    from marlwatch.runner import Run

    try:
        return Run(cfg)
    except (KeyError, ValueError, LaunchError) as e:
        raise UsageError(str(e).strip("'\"")) from None


def make_run(args: argparse.Namespace, default_iterations: int | None, *, command_log: bool = False) -> Run:
    """Build (not start) the Run the arguments ask for.
    `command_log`: a command's output goes to a log beside the recording (the live app owns the terminal)."""
    cfg = run_config(args, default_iterations)
    cfg.command_log = command_log and cfg.command is not None
    run = build_run(cfg)
    if getattr(args, "latency_bound", None) is not None:
        # In the run info, so every Metrics of this run (live, replay, summary) shows it.
        run.info.extra["latency_bound_ms"] = args.latency_bound
    return run


def make_flame(run: Run, args: argparse.Namespace, *, always: bool = False) -> FlameController | None:
    """The py-spy controller of `run`: when --flame / --auto-flame asked for one, or `always` (the
    live app's `f` key needs one)."""
    from marlwatch.flame import DEFAULT_RATE
    from marlwatch.flame.controller import FlameController

    requests = getattr(args, "flame", None) or []
    auto = bool(getattr(args, "auto_flame", False))
    if not requests and not auto and not always:
        return None
    flame = FlameController(run, rate=getattr(args, "flame_rate", DEFAULT_RATE), auto=auto)
    for phase, seconds in requests:
        flame.request(phase, seconds)
    return flame


def start_run(run: Run) -> None:
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
    return run_headless(args) if args.headless else run_live(args)


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
            return fail(f"forced stop; recording kept up to now in {run.record_path}", EXIT_INTERRUPTED)
        if tty:
            print(file=sys.stderr)
        snap = metrics.snapshot()
        if args.json:
            print(json.dumps(finite(snap.to_json()), indent=2, default=str, allow_nan=False))
        else:
            print(summary_text(snap, str(run.record_path), "complete" if snap.complete else "truncated"))
        return finish_message(run, snap)


def _print_exports(run: Run) -> None:
    """What a user pastes into the shell that starts the processes to watch (stdout: scriptable)."""
    print(f"export MARLWATCH_ADDRESS={run.monitor.address}")
    print(f"export MARLWATCH_AUTHKEY={run.monitor.authkey.hex()}", flush=True)


BLANK_ENV = "MARLWATCH_APP_BLANK_S"


def _blank_s() -> float | None:
    """bench/bench_app.py's in-run A/B: the app draws only every other window of this many
    seconds (LiveApp's `blank_s`); unset or empty: always."""
    raw = os.environ.get(BLANK_ENV, "")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.5 <= value <= 3600:
        raise UsageError(f"{BLANK_ENV} must be a number of seconds from 0.5 to 3600, got {raw!r}")
    return value


def _terminal_gone() -> None:
    """After SIGHUP, the terminal is gone: every write to it fails. The kernel sends SIGCONT with
    the SIGHUP, and Textual's SIGCONT handler starts its output thread again on the dead terminal;
    that thread dies at its first write, and Textual's shutdown then waits for it for ever. So no
    resume, and the terminal's output goes to /dev/null (the end-of-run lines cannot be shown)."""
    signal.signal(signal.SIGCONT, signal.SIG_DFL)
    to_devnull(*(fd for fd in (1, 2) if os.isatty(fd)))


# Normally the app is gone well within this after the recording is finished.
LEAVE_AFTER_RECORDED_S = 15.0


def _leave_once_recorded(run_done: threading.Event, grace_s: float, code: int) -> None:
    """A stop signal's guarantee, whatever the UI does: once the run's thread has finished the
    recording (`run_done`), the process ends within LEAVE_AFTER_RECORDED_S, with `code`."""

    def watch() -> None:
        run_done.wait(grace_s)
        time.sleep(LEAVE_AFTER_RECORDED_S)
        # The recording is closed; the children end with us (parent-death signal). Not
        # `exit_now`: its flush would wait on a stream lock the stuck UI may hold.
        os._exit(code)

    threading.Thread(target=watch, name="leave-once-recorded", daemon=True).start()


def run_live(args: argparse.Namespace) -> int:
    """`marlwatch run` with the app. Bad input fails before the terminal is taken over."""
    from marlwatch.app.live import UI_NICE, LiveApp
    from marlwatch.lifecycle import STOP_SIGNALS
    from marlwatch.report import human_bytes, summary_text
    from marlwatch.runner import STOP_GRACE_S

    refresh = args.refresh
    if not 0.1 <= refresh <= 30:
        raise UsageError(f"--refresh must be between 0.1 and 30 redraws per second, got {refresh}")
    blank_s = _blank_s()
    run = make_run(args, default_iterations=None, command_log=True)
    flame = make_flame(run, args, always=True)
    app = LiveApp(run, flame, refresh_hz=refresh, blank_s=blank_s, ui_nice=UI_NICE)

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            _terminal_gone()
        if run.stop_signal is None:
            _leave_once_recorded(app.run_done, STOP_GRACE_S + 30, 128 + signum)
        run.stop_signal = run.stop_signal or signum
        app.interrupted = True
        app.stop()

    # Ctrl-C reaches the app as a key (the terminal is in raw mode); these are for `kill`, and
    # SIGHUP for a terminal or SSH session that closes under the app: a clean stop, like q.
    old = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        start_run(run)
        app.run()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        # Whatever ended the app, the run's thread finishes the run (never two threads on it),
        # then no child may outlive us and the recording gets its end marker.
        app.stop()
        if app.pumping:
            app.run_done.wait(STOP_GRACE_S + 10)
        if run.started:
            run.abort("app exited")
    snap: Snapshot = app.snapshot or app.metrics.snapshot()
    if app.ended is not None:
        snap = app.ended.snapshot
    # The status is the file's: the run's thread may not have finished it (the fallback above).
    complete = run.writer is not None and run.writer.closed and run.writer.failed is None
    with contextlib.suppress(OSError):  # a terminal that went away (SIGHUP) cannot show it
        print(summary_text(snap, str(run.record_path), "complete" if complete else "truncated"))
        say(f"recording {run.record_path} ({human_bytes(run.recording_bytes)})")
    if app.return_code and run.failure is None and run.cfg.command is None:  # the app itself failed
        return app.return_code
    result = finish_message(run, snap)
    if result == EXIT_OK and app.interrupted and run.stop_signal is None:
        return EXIT_INTERRUPTED  # Ctrl-C as a key
    return result


def finish_message(run: Run, snap: Snapshot) -> int:
    """The last lines after a run, and marlwatch's exit code: the command's own for a command
    (a command that fails is not a marlwatch failure), 1 for a failed run, 128+N after signal N."""
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
        return fail(f"run failed: {run.failure} (recording kept: {run.record_path})", EXIT_FAILED)
    if run.stop_signal is not None:
        return signal_exit_code(run.stop_signal)
    return EXIT_OK

"""The commands that read recordings: summary, replay, diff, export, flame, repair (and algorithms).

Each opens its files with `open_or_fail` and reads them inside `reading(path)`, so a file that is
not a recording, holds nothing valid or is damaged ends the command with one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from pathlib import Path

from marlwatch.cli.errors import EXIT_FAILED, EXIT_OK, UsageError, open_or_fail, reading, warn_skipped
from marlwatch.terminal import finite, printable, say


def _print_json(obj: object) -> None:
    print(json.dumps(finite(obj), indent=2, default=str, allow_nan=False))


def cmd_summary(args: argparse.Namespace) -> int:
    from marlwatch.metrics import summarize
    from marlwatch.report import summary_text

    rec = open_or_fail(args.file)
    if args.latency_bound is not None:
        rec.info.extra["latency_bound_ms"] = args.latency_bound
    with reading(args.file):
        snap = summarize(rec, exact=args.exact)
    if args.json:
        _print_json({**snap.to_json(), "status": rec.status})
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


def cmd_algorithms(args: argparse.Namespace) -> int:
    from algorithms import ALGORITHMS

    print(f"{'name':<13} {'training':<14} {'communication':<18} {'default env':<15} what is communicated")
    for s in ALGORITHMS.values():
        print(f"{s.name:<13} {s.training:<14} {s.communication:<18} {s.default_env:<15} {s.description}")
    return EXIT_OK


# -- replay -------------------------------------------------------------------------------------
def load_replay(path: str):  # -> tuple[Playback, str, int]
    """Open and read a recording for replay; bad files raise UsageError with one line."""
    from marlwatch.playback import Playback

    rec = open_or_fail(path)
    with reading(path):
        playback = Playback.from_recording(rec)
    if playback.rows == 0:
        raise UsageError(f"{path}: the recording holds no rows")
    return playback, rec.status, rec.path.stat().st_size


def run_app(app, **run_kwargs: object) -> int:
    """Run a Textual app; its exit code. Textual ends an app on an exception nothing handled,
    restores the terminal and prints the traceback, and sets `return_code` (1): that is a failure."""
    app.run(**run_kwargs)
    return app.return_code or EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from marlwatch.app.replay import ReplayApp

    playback, status, size = load_replay(args.file)
    app = ReplayApp(playback, args.file, size, status, at_s=args.at, play=not args.paused, speed=args.speed)
    code = run_app(app)
    if playback.source is not None:  # on the terminal again: the app showed it as a notice
        warn_skipped(playback.source)
    return code


# -- diff ---------------------------------------------------------------------------------------
def cmd_diff(args: argparse.Namespace) -> int:
    from marlwatch import diff
    from marlwatch.validate import MAX_RESAMPLES, BoundExceeded

    if args.fail_if_slower is not None and not args.fail_if_slower >= 0:
        raise UsageError(f"--fail-if-slower takes a percentage >= 0, got {args.fail_if_slower}")
    if not 100 <= args.resamples <= MAX_RESAMPLES:
        raise UsageError(f"--resamples must be between 100 and {MAX_RESAMPLES:,}, got {args.resamples}")
    if args.skip < 0:
        raise UsageError(f"--skip must be >= 0, got {args.skip}")
    if not args.min_change >= 0:
        raise UsageError(f"--min-change takes a percentage >= 0, got {args.min_change}")
    recs = [open_or_fail(path) for path in (args.a, args.b)]
    # B is read on a second thread while A is read here: most of reading is Arrow decompressing,
    # which runs without the GIL, so on two cores the two files take little more than one.
    # A daemon thread: a Ctrl-C ends the command without waiting for it. Any other error waits for
    # it, so that nothing reads a file after the command has returned (called in-process, the
    # caller may rewrite the file next, under a reader that is not done with it).
    # Errors are reported in the order A, B, as when they were read one after the other.
    outcome: dict[str, object] = {}

    def read_b() -> None:
        try:
            outcome["side"] = diff.read_side(recs[1], args.skip, exact=args.exact)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there
            outcome["error"] = e

    other = threading.Thread(target=read_b, name="diff-read-b", daemon=True)
    other.start()
    sides = []
    try:
        for i, path in enumerate((args.a, args.b)):
            with reading(path):
                try:
                    if i == 0:
                        sides.append(diff.read_side(recs[0], args.skip, exact=args.exact))
                    else:
                        other.join()
                        if "error" in outcome:
                            raise outcome["error"]  # type: ignore[misc]
                        sides.append(outcome["side"])
                except BoundExceeded as e:
                    raise UsageError(f"{path}: {e}") from None
    except Exception:
        other.join()
        raise
    for rec in recs[:1] if recs[0].path.resolve() == recs[1].path.resolve() else recs:
        warn_skipped(rec)  # once both are known to be comparable: an error stays the only line
    try:
        d = diff.compare(*sides, resamples=args.resamples, seed=args.seed, min_change=args.min_change)
    except BoundExceeded as e:  # the bootstrap's bound
        raise UsageError(str(e)) from None
    if args.json:
        _print_json(d.to_json())
    else:
        print(diff.render(d))
    if args.fail_if_slower is not None:
        ips = d.row("IPS")
        # Slower with confidence: even the most favourable end of the interval is below -PCT.
        if not math.isnan(ips.hi) and ips.hi < -args.fail_if_slower:
            print(f"marlwatch: B is slower: IPS {ips.change:+.1f}% [{ips.lo:+.1f}, {ips.hi:+.1f}], "
                  f"beyond -{args.fail_if_slower:g}%", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


# -- export -------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from marlwatch.export import export_perfetto, export_tables
    from marlwatch.outputs import OutputError, atomic_output

    rec = open_or_fail(args.file)
    out = Path(args.out)
    created_dir = False
    if args.to != "perfetto":
        try:
            if out.exists() and not out.is_dir():
                raise UsageError(f"cannot write {out}: exists and is not a directory")
            created_dir = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    with reading(args.file):
        try:
            if args.to == "perfetto":
                with atomic_output(out, inputs=(rec.path,)) as f:
                    n = export_perfetto(rec, f)
                what = f"{n} trace events"
            else:
                rows = export_tables(rec, out, args.to)
                what = ", ".join(f"{k} {v} rows" for k, v in rows.items() if v or k != "stacks")
        except (OutputError, BrokenPipeError):
            # The output cannot be opened (bad input, exit 2), or a reader stopped reading (`| head`).
            _remove_dir(out, created_dir)
            raise
        except OSError as e:  # writing failed after it started (a full disk)
            _remove_dir(out, created_dir)
            say(f"export to {out} failed: {e.strerror or e}")
            return EXIT_FAILED
        except BaseException:
            _remove_dir(out, created_dir)
            raise
    warn_skipped(rec)
    status = "" if rec.complete else f" (recording {rec.status}: exported what it holds)"
    say(f"wrote {out}: {what}{status}")
    return EXIT_OK


def _remove_dir(out: Path, created: bool) -> None:
    """The tables' folder, when this export created it and nothing else was put in it since."""
    if created:
        try:
            out.rmdir()
        except OSError:
            pass


# -- flame --------------------------------------------------------------------------------------
def cmd_flame(args: argparse.Namespace) -> int:
    from marlwatch.flame.render import (
        by_function,
        flame_svg,
        no_samples_reason,
        read_stacks,
        speedscope,
        top_functions_text,
    )
    from marlwatch.outputs import write_text

    rec = open_or_fail(args.file)
    phase = args.phase.strip().strip("/")
    if not phase:
        raise UsageError("--phase must name a phase, e.g. update or sample/env_step")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    with reading(args.file):
        read = read_stacks(rec, phase)
    if not read.stacks:
        raise UsageError(no_samples_reason(args.file, phase, read, rec.info.procs))
    stacks = read.stacks if args.lines else by_function(read.stacks)
    if args.to == "text":
        text = top_functions_text(stacks, phase, args.top)
    elif args.to == "speedscope":
        per_slot = read.per_slot if args.lines else {k: by_function(v) for k, v in read.per_slot.items()}
        text = json.dumps(speedscope(per_slot, phase, rec.info.procs))
    else:
        text = flame_svg(stacks, f"marlwatch: {phase} ({rec.info.title()})")
    if args.out is None:
        print(text)
    else:
        try:
            write_text(args.out, text + "\n", inputs=(rec.path,))
        except OSError as e:
            raise UsageError(f"cannot write {args.out}: {e.strerror or e}") from None
        say(f"wrote {args.out} ({sum(stacks.values())} samples of '{phase}')")
    warn_skipped(rec)
    return EXIT_OK


# -- repair -------------------------------------------------------------------------------------
def cmd_repair(args: argparse.Namespace) -> int:
    from marlwatch.outputs import OutputError
    from marlwatch.repair import default_output, repair

    src = Path(args.file)
    dst = Path(args.output) if args.output else default_output(src)
    with reading(src):
        try:
            kept = repair(src, dst)
        except OutputError:
            raise
        except OSError as e:
            raise UsageError(f"cannot write {dst}: {e.strerror or e}") from None
    print(printable(f"{kept['output']}: {kept['batches']} complete batches, {kept['rows']:,} rows, "
                    f"{kept['spans']:,} spans"))
    warning = []
    if kept["tail_lost"]:
        warning.append("was cut mid-batch; the rows after its last complete batch are lost")
    elif not kept["complete"]:
        warning.append("has no end-of-run marker; the run's tail was never written")
    if kept["skipped"]:
        warning.append(kept["skipped"] + "; left out of the repaired file")
    if warning:
        say(f"{src} " + "; ".join(warning), warning=True)
    else:
        say(f"{src} was complete; nothing was lost")
    return EXIT_OK

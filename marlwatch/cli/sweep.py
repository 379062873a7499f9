"""`marlwatch sweep` and `marlwatch report`: run an agents x workers grid, one headless run per
cell, and tabulate and plot it (the table: marlwatch/sweep.py; the plots: marlwatch/sweep_report.py)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from marlwatch.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError, reading, signal_exit_code
from marlwatch.cli.run import build_run, start_run
from marlwatch.recording import default_record_path
from marlwatch.report import plural
from marlwatch.runner import RunConfig, drive, stop_on_signals
from marlwatch.sweep import markdown, new_folder, recordings_in, save, table
from marlwatch.terminal import say


def _check_plotting() -> None:
    from marlwatch.sweep_report import ReportError, check_plotting

    try:
        check_plotting()  # before anything runs: a missing extra is bad input, not a failed sweep
    except ReportError as e:
        raise UsageError(str(e)) from None


def cmd_sweep(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_record_path(f"sweep-{args.algo}", suffix="")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    settings = dict(args.settings)
    if args.report:
        _check_plotting()
    cells = []
    # Build every cell's Run first, so a bad --algo/--env/--set fails before anything runs.
    for w in args.workers:
        for a in args.agents:
            cfg = RunConfig(algo=args.algo, env=args.env, agents=a, workers=w, iterations=args.iterations,
                            seed=args.seed, record=f"{args.algo}-a{a}-w{w}.arrow", overwrite=args.force,
                            ignore_limits=args.ignore_limits, settings=settings)
            run = build_run(cfg)
            if args.latency_bound is not None:  # each recording carries the bound (summary, replay, report)
                run.info.extra["latency_bound_ms"] = args.latency_bound
            cells.append(run)
    taken = [run.record_path.name for run in cells if (out / run.record_path.name).exists()]
    if args.out and taken and not args.force:
        raise UsageError(f"--out {out} holds recordings already ({', '.join(taken)}); not overwritten "
                         "(--force overwrites them, or choose another --out)")
    try:
        if args.out:
            out.mkdir(parents=True, exist_ok=True)
        else:
            out = new_folder(out)
    except OSError as e:
        raise UsageError(f"--out {out}: {e.strerror}") from None
    for run in cells:  # the folder is known now
        run.record_path = out / run.record_path.name
        run.cfg.record = str(run.record_path)
    done: list[Path] = []
    for k, run in enumerate(cells, 1):
        print(f"marlwatch: sweep cell {k}/{len(cells)}: {args.algo}, {plural(run.cfg.agents, 'agent')}, "
              f"{plural(run.workers, 'worker')}, {plural(args.iterations, 'iteration')} -> {run.record_path}",
              file=sys.stderr, flush=True)
        try:
            # Ctrl-C, SIGTERM (a job scheduler's stop) and SIGHUP end this cell cleanly, its
            # recording complete, and the sweep with it; a second one forces the end.
            with stop_on_signals(run):
                start_run(run)
                drive(run)
        except KeyboardInterrupt:
            print(f"marlwatch: sweep interrupted; {len(done)} complete cells kept in {out}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if run.stop_signal is not None:
            print(f"marlwatch: sweep stopped by {signal.Signals(run.stop_signal).name}; {len(done)} complete cells "
                  f"kept in {out}, and the stopped cell's recording {run.record_path.name}", file=sys.stderr)
            return signal_exit_code(run.stop_signal)
        if run.failure:
            say(f"sweep cell failed: {run.failure} (recording kept: {run.record_path})")  # the failure quotes user code
            return EXIT_FAILED
        done.append(run.record_path)
    with reading(out):
        rows = table(done)
    paths = save(out, args.algo, rows, args.latency_bound)
    print(markdown(args.algo, rows, args.latency_bound), end="")
    saved = [paths["csv"], paths["json"], paths["md"]]
    if not args.no_plots:
        from marlwatch.sweep_report import terminal_plots

        print(terminal_plots(rows, args.latency_bound, color=sys.stdout.isatty()), end="")
    if args.report:
        from marlwatch.sweep_report import write_report

        saved.append(write_report(out, rows, args.latency_bound))
    print(f"marlwatch: saved {', '.join(map(str, saved))}", file=sys.stderr)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from marlwatch.outputs import write_text
    from marlwatch.sweep_report import REPORT_NAME, html_report, notes, recorded_bound, terminal_plots

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder (give the folder a sweep wrote)")
    paths = recordings_in(folder)
    if not paths:
        raise UsageError(f"{folder}: no recordings (*.arrow) in it")
    _check_plotting()
    with reading(folder):
        rows = table(paths)
        bound = args.latency_bound if args.latency_bound is not None else recorded_bound(folder, rows)
    out = Path(args.output) if args.output else folder / REPORT_NAME
    algos = ", ".join(sorted({r.algo for r in rows}))
    write_text(out, html_report(rows, bound, f"marlwatch sweep: {algos}", notes(rows, folder)), inputs=paths)
    print(terminal_plots(rows, bound), end="")
    print(f"marlwatch: saved {out}", file=sys.stderr)
    return EXIT_OK

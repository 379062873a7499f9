"""`main`: parse the command line, run the subcommand, and make every ending one line and an exit code."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from marlwatch.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, RunFailed, UsageError, fail
from marlwatch.cli.parser import COMMANDS, build_parser
from marlwatch.lifecycle import STOP_SIGNALS
from marlwatch.outputs import OutputError
from marlwatch.terminal import to_devnull


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
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # closed, or not a file
        return
    to_devnull(fd)


_interrupted_before_start = False


def entry() -> None:
    """The `marlwatch` command and `python -m marlwatch`: main(), then exit with its code."""
    code = main()
    # The command has done its work and chosen its code: a late signal (the second of a quick
    # Ctrl-C Ctrl-C, after a stop faster than the two) has nothing left to stop, and must not make
    # this exit a death by signal.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if _interrupted_before_start:
        # CPython 3.11 can end a process that caught a KeyboardInterrupt raised during an import
        # (seen inside dataclasses' exec'd methods) by SIGINT at shutdown, instead of with our
        # code (seen: status -2 after "marlwatch: interrupted"). Nothing was started: exit as said.
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> NoReturn:
    """Flush what was said and end the process with `code`, past the interpreter's shutdown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _from_interrupt(e: BaseException) -> bool:
    """Whether a Ctrl-C is what `e` comes from: Python wraps an exception raised while a class is
    being made (a KeyboardInterrupt landing in a dataclass field's `__set_name__` during an
    import) in a RuntimeError."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def main(argv: Sequence[str] | None = None) -> int:
    real_stdout = sys.stdout
    sys.stdout = _GuardedStdout(real_stdout)  # type: ignore[assignment]
    try:
        try:
            code = _main(argv)
        except Exception as e:
            if not _from_interrupt(e):
                raise
            raise KeyboardInterrupt from e
        sys.stdout.flush()  # a full disk shows here, while we can still say so in one line
        return code
    except KeyboardInterrupt:
        # Ctrl-C before a command installed its own handler (`run` does, before it starts any
        # process): still importing torch or reading a file, nothing started, nothing to keep.
        global _interrupted_before_start
        _interrupted_before_start = True
        return fail("interrupted", EXIT_INTERRUPTED)
    except StdoutError as e:
        sys.stdout = real_stdout
        _stdout_to_devnull()
        return fail(f"cannot write to standard output: {e.strerror}", EXIT_FAILED)
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
        args = build_parser().parse_args(own)
        if args.command is None:
            args = build_parser().parse_args(["run", *own])
    except UsageError as e:
        return fail(str(e))
    args.user_command = user_command
    module, function, _ = COMMANDS[args.command]
    try:
        return getattr(importlib.import_module(f"marlwatch.cli.{module}"), function)(args)
    except (UsageError, OutputError) as e:
        return fail(str(e))
    except RunFailed as e:
        return fail(f"run failed: {e}", EXIT_FAILED)
    except BrokenPipeError:
        _stdout_to_devnull()  # output piped into `head`, which has read what it wanted
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

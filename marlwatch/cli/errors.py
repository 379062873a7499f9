"""How the command line ends: exit codes, its two errors, and the one line a user reads.

Library code raises its own errors (`RecordingError`, `ValueError`, `LaunchError`, `OutputError`);
the commands turn them into `UsageError` (exit 2) or `RunFailed` (exit 1), and `main` prints either
as one `marlwatch: ...` line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from marlwatch.terminal import say

if TYPE_CHECKING:
    from marlwatch.recording import Recording

# The exit codes of every command: 0 done; 1 the run failed (a process crashed, the recording or an
# output could not be written) or `diff --fail-if-slower` found B slower; 2 bad input (flags,
# files); 130 stopped by Ctrl-C or SIGTERM (128 + N after signal N: the recording is complete).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class RunFailed(Exception):
    """A run that failed, before or while running: printed as one line, exit code 1."""


def fail(message: str, code: int = EXIT_USAGE) -> int:
    """Say `message` as the one `marlwatch:` line (made printable: it names files and quotes
    what was in them) and return `code`."""
    say(message)
    return code


def open_or_fail(path: str) -> Recording:
    """The recording at `path`; a file that is not one is a usage error."""
    from marlwatch.recording import RecordingError, open_recording

    try:
        return open_recording(path)
    except RecordingError as e:
        raise UsageError(str(e)) from None


@contextmanager
def reading(path: object) -> Iterator[None]:
    """Around code that reads the recording at `path`: whatever a damaged or hostile file makes
    it raise becomes one line, exit 2, never a traceback. A RecordingError (nothing valid in the
    file, a bound exceeded) keeps its own message; anything else says the file is damaged."""
    from marlwatch.outputs import OutputError
    from marlwatch.recording import RecordingError

    try:
        yield
    except RecordingError as e:
        raise UsageError(str(e)) from None
    except (UsageError, OutputError, BrokenPipeError):  # not about the recording
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file must give one line, not a traceback
        raise UsageError(f"{path}: damaged recording ({type(e).__name__}: {e})") from None


def warn_skipped(rec: Recording, also: str | None = None) -> None:
    """The one warning line about `rec`: `also` (another thing to say about the file, such as
    "is truncated: ..."), then what the reader left out of it (rows, batches, metadata)."""
    line = f"{rec.path} {also}" if also else f"{rec.path}:"
    if rec.skipped:
        line += ("; " if also else " ") + rec.skipped.describe() + "; the figures leave them out"
    if also or rec.skipped:
        say(line, warning=True)


def signal_exit_code(signum: int | None) -> int:
    """The exit code of a run stopped by `signum`: 128 + N, as a shell reports it (130 for Ctrl-C)."""
    return 128 + int(signum) if signum else EXIT_OK

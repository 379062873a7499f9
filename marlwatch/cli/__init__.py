"""The `marlwatch` command: the one layer that turns errors into a `marlwatch:` line and an exit code.

- `errors`: exit codes, `UsageError` (exit 2) and `RunFailed` (exit 1), opening and reading a
  recording so that a damaged file is one line.
- `parser`: every subcommand's arguments (imports no command's code).
- `main`: parse, dispatch, and guard standard output.
- `run` (`run`, `listen`, the live app), `files` (summary, replay, diff, export, flame, repair,
  algorithms), `sweep`: the commands. Each takes the parsed arguments, calls library code and
  returns an exit code.

Nothing below this package imports it (tests/test_layers.py).
"""

from marlwatch.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RunFailed, UsageError
from marlwatch.cli.main import main

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "RunFailed", "UsageError", "main"]

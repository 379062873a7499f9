"""What may be shown on a terminal: recorded strings made printable, and the `marlwatch:` lines.

A recording is untrusted input: a phase name, a role, a metadata field or an event's detail can
hold escape sequences that set the terminal's title, clear the screen or worse, and a path given
on the command line can hold bytes that are not text at all. Every place that shows such a
string (the text commands, error messages, the app's panels) passes it through `printable`, so
the one rule lives here. JSON output needs no such care (json.dumps escapes control characters),
but it must not hold NaN or infinity: `finite` turns those into null.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any

# C0 and C1 controls and DEL (ESC starts every terminal sequence; C1 0x9b is a one-byte CSI),
# the Unicode bidirectional overrides and isolates (they reorder what follows on the line),
# line and paragraph separators, and lone surrogates (a path's undecodable bytes under
# surrogateescape; printing one raises UnicodeEncodeError).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_KEEP_NEWLINES = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
                                   "\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: object, *, newlines: bool = False) -> str:
    """`text` (any value, shown with str()) with every character that could act on a terminal
    written as a visible escape (`\\x1b`, `\\u202e`); with `newlines`, line breaks are kept."""
    s = text if isinstance(text, str) else str(text)
    return (_UNSAFE_KEEP_NEWLINES if newlines else _UNSAFE).sub(_escape, s)


def say(message: str, *, warning: bool = False, file: Any = None) -> None:
    """One `marlwatch: ...` line on stderr (`marlwatch: warning: ...` with `warning`)."""
    prefix = "marlwatch: warning: " if warning else "marlwatch: "
    print(prefix + printable(message), file=file or sys.stderr)


def finite(x: Any) -> Any:
    """`x` with every NaN or infinite float (in nested dicts, lists and tuples) made None, so
    that json.dumps writes null instead of NaN, which is not JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def to_devnull(*fds: int) -> None:
    """Point these output file descriptors at /dev/null: the terminal or pipe behind them is gone,
    and what is still written there (buffered lines, a UI's shutdown) must neither fail nor block."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for fd in fds:
            try:
                os.dup2(devnull, fd)
            except OSError:
                pass
    finally:
        os.close(devnull)

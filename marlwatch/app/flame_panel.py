"""The "top functions" panel: what py-spy found running while the selected phase ran.

It only displays `Snapshot.top_functions()` (Metrics counts the recording's `stack` rows), so
the live view shows samples as soon as a capture is stored and replay shows them from their
point in time on. Hidden until the snapshot holds samples; the app's `t` (or escape) closes
it, and it opens again with `t` or when new samples arrive. See docs/flame.md.
"""

from __future__ import annotations

import os

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from marlwatch.metrics import Snapshot
from marlwatch.report import percent
from marlwatch.terminal import printable

ROWS = 6


def short_path(path: str) -> str:
    """`/venv/lib/python3.11/site-packages/torch/optim/adam.py)` -> `torch/optim/adam.py)`."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    cwd = os.getcwd().rstrip("/") + "/"
    return path[len(cwd):] if path.startswith(cwd) else path


class TopFunctionsPanel(Static):
    DEFAULT_CSS = """
    TopFunctionsPanel { height: auto; max-height: 9; border: round $primary; padding: 0 1; display: none;
                        border-title-color: $text; border-title-style: bold;
                        text-wrap: nowrap; text-overflow: ellipsis; }
    TopFunctionsPanel.-has-samples { display: block; }
    TopFunctionsPanel.-has-samples.-closed { display: none; }
    """
    # Repainted by _update, only when what it shows changed (see widgets.Lines).
    snapshot: reactive[Snapshot | None] = reactive(None, always_update=True, repaint=False)
    phase: reactive[str | None] = reactive(None)

    def __init__(self, hint: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.hint = hint  # after "no samples taken while X ran": how to get some on this screen
        self.lines: list[tuple[str, int]] = []  # what is shown, for tests
        self.samples = 0  # samples in the snapshot (any phase)
        self._closed_at: int | None = None  # `samples` when the user closed the panel
        self._shown: tuple | None = None

    @property
    def has_samples(self) -> bool:
        return self.samples > 0

    @property
    def is_open(self) -> bool:
        return self.has_samples and self._closed_at is None

    def toggle(self) -> None:
        """Close the panel when open, open it when closed (the app's `t`)."""
        self.set_closed(self.is_open)

    def set_closed(self, closed: bool) -> None:
        self._closed_at = self.samples if closed else None
        self.set_class(closed, "-closed")

    def watch_snapshot(self) -> None:
        self._update()

    def watch_phase(self) -> None:
        self._update()

    def _update(self) -> None:
        s = self.snapshot
        self.samples = sum(sum(f.values()) for f in s.stacks.values()) if s else 0
        if self._closed_at is not None:
            if self.samples > self._closed_at:
                self.set_closed(False)  # a new capture's samples: show them
            else:
                self._closed_at = self.samples  # fewer (replay seeked back): samples from here on are new
        self.set_class(self.has_samples, "-has-samples")
        if not s or not s.stacks:
            self.lines = []
            return
        phase = self.phase or ""
        shown = printable(phase) or "-"
        self.lines = s.top_functions(phase, ROWS) if phase else []
        total = sum(s.phase_samples(phase).values()) if phase else 0
        title = Text(f"py-spy: top functions in {shown}")  # Text: a str would be parsed as markup
        subtitle = f"{total} samples · t closes"
        text = Text(no_wrap=True, overflow="ellipsis")
        if not self.lines:
            text.append(f"no py-spy samples taken while {printable(phase) or 'this phase'} ran{self.hint}",
                        style="dim")
        for i, (func, n) in enumerate(self.lines):
            if i:
                text.append("\n")
            text.append(f"{percent(n / total, 5)} ", style="bold")
            text.append(f"{n:6d}  ")
            name, _, where = printable(func).partition(" (")
            text.append(name, style="bold magenta" if i == 0 else "")
            if where:
                text.append(" (" + short_path(where), style="dim")
        if (title, subtitle, text) != self._shown:
            self._shown = (title, subtitle, text)
            self.border_title, self.border_subtitle = title, subtitle
            self.update(text)

"""The screen both `run` and `replay` show: panels fed by Snapshots, keys in the footer."""

from __future__ import annotations

import time

from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from marlwatch.app.flame_panel import TopFunctionsPanel
from marlwatch.app.widgets import (
    CoresPanel,
    PhaseTable,
    RunHeader,
    Status,
    ThroughputPanel,
    TimePanel,
    WorkersPanel,
)
from marlwatch.metrics import Snapshot
from marlwatch.terminal import printable

# The phase table, cores and workers follow at most this often (the other panels: every refresh;
# `--refresh` and replay's playback go faster), as btop redraws (every 2 s): every cell of them
# changes at each refresh, and a table whose numbers all move every second cannot be read anyway;
# redrawing them was most of the app's drawing (docs/benchmarks.md §6). A key, a seek or the
# run's end shows all at once.
TABLE_HZ = 0.5
TALL_ROWS = 32  # from this terminal height on, the top panels get more room

HELP = """\
[b]marlwatch[/b]: where the time of a multi-agent RL run goes

[b]Where the time goes[/b]: process time of all processes split into
  [dodger_blue2]sample[/] (acting, env steps), [magenta]update[/] (losses, backward, optimiser)
  and [yellow]sync[/] (waiting, weights and batches between processes).
  [b]comm / execution[/b]: communication time over sample+update time.
  [b]comm / model update[/b]: communication inside update over update time.
[b]Phases[/b]: every span path; ✉ marks communication; the hottest leaf is red.
[b]Cores[/b]: utilisation now, the processes pinned there, CPU and memory.
[b]py-spy[/b]: ↑/↓ select a phase; the panel under the table lists the functions py-spy
  found running while it ran{flame_how}; t or escape hides the panel, t shows it
  again (as new samples do). See docs/flame.md.

{keys}

Press any key to close."""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 84; max-width: 100%; height: auto; max-height: 100%;
                                  border: round $accent; background: $panel; padding: 0 1; }
    """

    def __init__(self, keys: str, flame_how: str = "") -> None:
        super().__init__()
        self.keys = keys
        self.flame_how = flame_how
        self._dismissing = False

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP.format(keys=self.keys, flame_how=self.flame_how))

    def on_key(self, event: events.Key) -> None:
        event.stop()
        # The screen leaves the stack only after this handler: a second key already queued (a fast
        # typist, a paste) reached it again, and its dismiss popped the app's last screen
        # (ScreenStackError, the app died). Keys that arrive while it closes are dropped.
        if not self._dismissing:
            self._dismissing = True
            self.dismiss()


class WatchApp(App[int]):
    """Shared by the live app and replay; subclasses feed `show()`."""

    CSS_PATH = "marlwatch.tcss"
    TITLE = "marlwatch"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "interrupt", "quit", show=False, priority=True),
        Binding("p", "pause", "pause"),
        Binding("s", "sort", "sort"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("up", "select(-1)", "select", key_display="↑↓", priority=True),
        Binding("down", "select(1)", "select phase", show=False, priority=True),
        # Shown only while there are py-spy samples (check_action).
        Binding("t", "toggle_flame", "py-spy panel"),
        Binding("escape", "close_flame", "close py-spy", show=False),
    ]
    KEYS_HELP = ""
    FLAME_HINT = ""  # after "no py-spy samples taken while X ran": how to get some on this screen
    FLAME_HOW = ""  # the same for the help screen

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: Snapshot | None = None
        self._tables_due = 0.0  # monotonic time from which the table panels take a new snapshot

    def notify(self, message: str, *, title: str = "", severity: str = "information",  # type: ignore[override]
               timeout: float | None = None, markup: bool = False) -> None:
        """Textual's notify, but plain text by default: messages quote phase names, paths and
        errors, and markup in them (`[@click=...]`, `x[/]`) must show, not act or crash."""
        super().notify(printable(message, newlines=True), title=printable(title), severity=severity,
                       timeout=timeout, markup=markup)

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        with Horizontal(id="top"):
            yield ThroughputPanel(id="throughput")
            yield TimePanel(id="time")
        yield PhaseTable(id="phases")
        yield TopFunctionsPanel(self.FLAME_HINT, id="flame")  # hidden until py-spy samples exist (docs/flame.md)
        with Horizontal(id="bottom"):
            yield CoresPanel(id="cores")
            yield WorkersPanel(id="workers")
        yield Footer()

    def on_resize(self, event: events.Resize) -> None:
        self.screen.set_class(event.size.height >= TALL_ROWS, "-tall")

    def show(self, snapshot: Snapshot, status: Status, *, everything: bool = True) -> None:
        """Hand new figures down to the panels; without `everything` (the refresh timer's), the
        table panels only once 1/TABLE_HZ passed since they last had some."""
        self.snapshot = snapshot
        header = self.query_one(RunHeader)
        header.set_reactive(RunHeader.snapshot, snapshot)  # no watcher: setting the status draws it, once
        header.status = status
        for panel in (ThroughputPanel, TimePanel):
            self.query_one(panel).snapshot = snapshot
        now = time.monotonic()
        if not everything and now < self._tables_due:
            return
        self._tables_due = now + 1.0 / TABLE_HZ
        for panel in (PhaseTable, CoresPanel, WorkersPanel):
            self.query_one(panel).snapshot = snapshot
        flame = self.query_one(TopFunctionsPanel)
        had = flame.has_samples
        flame.phase = self.query_one(PhaseTable).selected_phase
        flame.snapshot = snapshot
        if flame.has_samples != had:
            self.refresh_bindings()  # `t` appears in the footer with the first samples
        self._flame_layout()

    def _flame_layout(self) -> None:
        """The screen's layout follows the py-spy panel (marlwatch.tcss: on a short screen it
        takes the place of Cores and Workers while open)."""
        self.screen.set_class(self.query_one(TopFunctionsPanel).is_open, "-flame-open")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("toggle_flame", "close_flame"):
            return self.query_one(TopFunctionsPanel).has_samples
        return True

    def action_toggle_flame(self) -> None:
        """t: hide or show the py-spy panel (it opens again by itself when new samples arrive)."""
        self.query_one(TopFunctionsPanel).toggle()
        self._flame_layout()

    def action_close_flame(self) -> None:
        self.query_one(TopFunctionsPanel).set_closed(True)
        self._flame_layout()

    def action_select(self, delta: int) -> None:
        """↑/↓: move the phase selection (the phase `f` profiles and the top-functions panel shows)."""
        table = self.query_one(PhaseTable)
        table.move_selection(delta)
        self.query_one(TopFunctionsPanel).phase = table.selected_phase

    def action_sort(self) -> None:
        self.query_one(PhaseTable).cycle_sort()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.KEYS_HELP, self.FLAME_HOW))

    def action_interrupt(self) -> None:
        self.action_quit()

"""The panels. Each one displays a `Snapshot` handed down to it; none computes a figure."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Console, Group
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Region, Size
from textual.reactive import reactive
from textual.strip import Strip
from textual.widgets import Static

from marlwatch.app.charts import column_plot, hbar, stacked_bar
from marlwatch.metrics import PhaseRow, ProcRow, Snapshot
from marlwatch.report import human_bytes, ms, percent, warming_up
from marlwatch.terminal import printable

TOP_STYLES = {"sample": "dodger_blue2", "update": "magenta", "sync": "yellow", "other": "grey50"}
STATE_STYLES = {"running": "green", "stalled": "bold yellow", "finished": "cyan", "crashed": "bold red",
                "stopped": "cyan", "starting": "dim", "exited": "dim"}


def clock(seconds: float) -> str:
    seconds = max(0.0, seconds)
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def short_role(role: str) -> str:
    return printable(role).replace("worker ", "w").replace("learner", "L")


@dataclass
class Status:
    """What the header says besides the run's configuration (mode, position, recording)."""

    mode: str  # LIVE, STOPPING, FINISHED, FAILED, REPLAY
    detail: str = ""  # e.g. "paused", "▶ 4x"
    elapsed: str = ""
    path: str = ""
    size: int = 0


# What a refresh costs is Textual composing the lines of the widgets that changed (a panel's
# lines: ~0.5 ms) and, when a widget asks for it, laying out the whole screen again. Between two
# refreshes many lines show the same thing as before (a worker's IPS, the cores, the header's
# path), so a panel repaints only the lines whose text changed, and asks for a layout pass only
# when its size can have changed (docs/benchmarks.md §6).


class ByLine:
    """A widget drawn from lines of Text, one strip a line (Textual's line API): going through
    `render()`, Rich's console machinery wrapped and cropped lines that never wrap, half of what a
    redraw cost. Subclasses say what the lines are (`drawn_lines`) and call `repaint` when they
    change."""

    def drawn_lines(self) -> list[Text]:
        raise NotImplementedError

    def render(self) -> Group:
        """All the lines (Textual measures an `auto` height from it); drawing goes by line."""
        return Group(*self.drawn_lines())

    @property
    def plain(self) -> str:
        """What the lines say, without styles."""
        return "\n".join(t.plain for t in self.drawn_lines())

    # The lines, base style and width for one render pass of the compositor, which cannot change
    # inside it: asked for at each line, `rich_style` (it walks every ancestor's styles) and the
    # size were ~40 % of what a line cost.
    _pass: tuple[list[Text], Style, int] | None = None

    def render_lines(self, crop: Region) -> list[Strip]:
        self._pass = (self.drawn_lines(), self.rich_style, self.size.width)  # type: ignore[attr-defined]
        try:
            return super().render_lines(crop)  # type: ignore[misc]
        finally:
            self._pass = None

    def render_line(self, y: int) -> Strip:
        lines, base, width = self._pass or (self.drawn_lines(), self.rich_style, self.size.width)  # type: ignore[attr-defined]
        if y >= len(lines):
            return Strip.blank(width, base)
        return line_strip(lines[y], width, base, self.app.console)  # type: ignore[attr-defined]

    def _resized_by(self, old: list[Text], new: list[Text]) -> bool:
        """Whether the new lines can change this widget's size: its height (width) is `auto` in the
        CSS and the number of lines (the widest line) changed. A layout redoes the whole screen,
        which cost more than all the repaints of a refresh, and the numbers of a line change width
        at almost every refresh; a fixed-size widget only repaints."""
        height, width = self.styles.height, self.styles.width  # type: ignore[attr-defined]
        if (height is None or height.is_auto) and len(new) != len(old):
            return True
        widest = max((t.cell_len for t in new), default=0) != max((t.cell_len for t in old), default=0)
        return widest and width is not None and width.is_auto

    def repaint(self, old: list[Text] | None, new: list[Text]) -> None:
        """After the lines went from `old` to `new`: lay the screen out again if the widget's size
        can follow them; else, as many lines as before, repaint only those that changed (Textual
        re-styles and re-composes just their regions; the rest stays as it is on screen)."""
        layout = self._resized_by(old or [], new)
        if layout or old is None or len(old) != len(new):
            self.refresh(layout=layout)  # type: ignore[attr-defined]
            return
        width = self.size.width  # type: ignore[attr-defined]
        changed = [y for y, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
        self.refresh(*(Region(0, y, width, 1) for y in changed))  # type: ignore[attr-defined]


def line_strip(text: Text, width: int, base: Style, console: Console) -> Strip:
    """One line of text as a strip `width` cells wide on the `base` style, cut with an ellipsis
    (or as the text's `overflow` says) when it is longer."""
    if text.cell_len > width:
        text = text.copy()
        text.truncate(width, overflow=text.overflow or "ellipsis")
    style = base + console.get_style(text.style) if text.style else base
    if not text.spans:
        # One style for the whole line (a plot row, a table row): one segment, without Rich's
        # span machinery, which was most of what such a line cost.
        segments = [Segment(text.plain, style)] if text.plain else []
        if text.cell_len < width:
            segments.append(Segment(" " * (width - text.cell_len), base))
        return Strip(segments, max(width, text.cell_len))
    return Strip(Segment.apply_style(text.render(console), style), text.cell_len).extend_cell_length(width, base)


class Lines(ByLine, Static):
    """Lines of Text shown as they are given: `show` repaints only the lines that differ from
    what is on screen (`ByLine.repaint`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shown: list[Text] | None = None

    def drawn_lines(self) -> list[Text]:
        return self.shown or []

    def show(self, *lines: Text) -> None:
        new = list(lines)
        if new == self.shown:
            return
        old, self.shown = self.shown, new
        self.repaint(old, new)



def set_subtitle(widget: Static | Vertical, text: str | Text) -> None:
    """border_subtitle, set only when it changes (setting it repaints the whole panel)."""
    if getattr(widget, "_subtitle_shown", None) != text:
        widget._subtitle_shown = text  # type: ignore[union-attr]
        widget.border_subtitle = text


class Drawn(ByLine):
    """For a panel drawn from its `snapshot`: a new snapshot repaints it only when `lines()`, what
    it would draw, differs from what it drew last, and only the lines that differ (its watcher,
    not the reactive, decides: declare `snapshot` with repaint=False). A resize repaints it as any
    widget."""

    _drawn: list[Text] | None = None
    _drawn_size: Size | None = None  # the size `_drawn` was made for

    def lines(self) -> list[Text]:
        raise NotImplementedError

    def redraw_if_changed(self) -> None:
        lines = self.lines()
        if lines == self._drawn:
            return
        old, self._drawn, self._drawn_size = self._drawn, lines, self.size  # type: ignore[attr-defined]
        self.repaint(old, lines)

    def drawn_lines(self) -> list[Text]:
        """What to draw: the lines the watcher has just compared (not made a second time for the
        same refresh), unless the size has changed since."""
        if self._drawn is None or self._drawn_size != self.size:  # type: ignore[attr-defined]
            self._drawn, self._drawn_size = self.lines(), self.size  # type: ignore[attr-defined]
        return self._drawn


class RunHeader(Drawn, Static):
    """Mode, position, run configuration, recording; a second line for the recording when narrow."""

    DEFAULT_CSS = """
    RunHeader { dock: top; height: auto; max-height: 2; background: $boost; }
    """
    snapshot: reactive[Snapshot | None] = reactive(None, always_update=True, repaint=False)
    status: reactive[Status] = reactive(Status("LIVE"), always_update=True, repaint=False)

    def on_resize(self) -> None:
        self.refresh(layout=True)  # one line or two depends on the width

    def watch_snapshot(self) -> None:
        self.redraw_if_changed()

    def watch_status(self) -> None:
        self.redraw_if_changed()

    def lines(self) -> list[Text]:
        st = self.status
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(" marlwatch ", style="bold reverse")
        mode_style = {"LIVE": "bold green", "FAILED": "bold red", "STOPPING": "bold yellow"}.get(st.mode, "bold cyan")
        text.append(f" {st.mode}", style=mode_style)
        if st.detail:
            text.append(f" {st.detail}", style="bold yellow")
        if st.elapsed:
            text.append(f" {st.elapsed}", style="bold")
        info = self.snapshot.info if self.snapshot else None
        if info:
            text.append(printable(f"  {info.title()}"))
        rec = Text(no_wrap=True, overflow="ellipsis")
        rec.append(f"  rec {human_bytes(st.size)} ", style="bold")
        rec.append(printable(st.path))
        if text.cell_len + rec.cell_len <= self.size.width:
            return [text + rec]
        return [text, Text(" ") + rec]


class ThroughputPanel(Drawn, Static):
    """IPS now and mean, iterations, latency; under them the IPS of each second, one column a
    second, newest at the right, scaled to the window's max.

    One widget drawn from plain lines: a widget per part (and a Sparkline's styled segment per
    cell) cost Textual's compositor several times as much for the same picture, once a second.
    """

    snapshot: reactive[Snapshot | None] = reactive(None, always_update=True, repaint=False)

    def on_mount(self) -> None:
        self.border_title = "Throughput"

    def watch_snapshot(self, s: Snapshot | None) -> None:
        if s is not None:
            self.redraw_if_changed()
            self._subtitle()

    def on_resize(self) -> None:
        self._subtitle()

    def _subtitle(self) -> None:
        s = self.snapshot
        if s is None:
            return
        startup = f"start-up {s.startup_s:.1f} s · " if s.startup_s is not None else ""
        # The seconds the plot shows: once it is full, the subtitle stays (a new one repaints the
        # whole panel, border and all). Before the first layout the width is not known yet.
        width = self.content_size.width
        shown = min(len(s.ips_history), width) if width > 0 else len(s.ips_history)
        set_subtitle(self, f"{startup}{shown} s history")

    def figures(self) -> list[Text]:
        """The two lines of figures above the plot."""
        s = self.snapshot
        if s is None:
            return []
        total = s.info.iterations if s.info and s.info.iterations else None
        line1 = Text(no_wrap=True, overflow="ellipsis")
        if s.startup_s is None:
            # No iteration has ended: a rate of zero would read as a measurement.
            line1.append(f"starting up… {s.t_s:.0f} s", style="bold yellow")
        else:
            line1.append(f"{s.ips_now:.2f}", style="bold green")
            line1.append(" IPS now  ")
            line1.append(f"mean {s.ips:.2f}", style="bold")
        line2 = Text(no_wrap=True, overflow="ellipsis")
        line2.append(f"it {s.iterations}" + (f"/{total}" if total else ""), style="bold")
        if not math.isnan(s.iteration_ms["p50"]):
            line2.append(f"  latency p50 {ms(s.iteration_ms['p50'])} p99 {ms(s.iteration_ms['p99'])} ms")
        if s.latency_bound_ms is not None and s.bounded_ips is not None:
            # Latency-bounded throughput (--latency-bound): only iterations within the bound count.
            met = "" if s.bound_met is None or math.isnan(s.bound_met) else f", {percent(s.bound_met)} of it"
            line1.append(f"  ≤{s.latency_bound_ms:g} ms: ")
            line1.append(f"{s.bounded_ips:.2f}", style="bold")
            line1.append(f" IPS{met}")
        return [line1, line2]

    def lines(self) -> list[Text]:
        figures = self.figures()
        if self.snapshot is None:
            return figures
        rows = column_plot(self.snapshot.ips_history, self.content_size.width, self.content_size.height - len(figures))
        return [*figures, *(Text(r, style="green", no_wrap=True, overflow="crop") for r in rows)]


class TimePanel(Drawn, Static):
    """Where the time goes: sample / update / sync, and the two communication shares."""

    snapshot: reactive[Snapshot | None] = reactive(None, always_update=True, repaint=False)

    def on_mount(self) -> None:
        self.border_title = "Where the time goes"

    def watch_snapshot(self) -> None:
        self.redraw_if_changed()

    def lines(self) -> list[Text]:
        s = self.snapshot
        if s is None or (s.process_s == 0 and s.startup_s is None):
            return [Text("waiting for the first spans…", style="dim")]
        width = max(1, self.content_size.width)
        shares = [(k, s.shares.get(k, 0.0)) for k in ("sample", "update", "sync", "other")]
        bar = stacked_bar([(v, TOP_STYLES[k]) for k, v in shares], width)
        legend = Text(no_wrap=True, overflow="ellipsis")
        shown = [(k, v) for k, v in shares if v or k != "other"]
        # One decimal when it fits, whole percents on a narrow panel.
        wide = sum(len(k) + 9 for k, _ in shown) <= width
        for k, v in shown:
            legend.append("■", style=TOP_STYLES[k])
            legend.append(f"{k} {percent(v, decimals=1 if wide else 0)} ")
        exec_line = Text(no_wrap=True, overflow="ellipsis")
        upd_line = Text(no_wrap=True, overflow="ellipsis")
        if s.startup_s is None:
            # Before the first iteration ends, all there is to show is start-up.
            exec_line.append(" starting up ", style="bold reverse yellow")
            exec_line.append(" no iteration has ended yet", style="bold")
            upd_line.append(" the shares above are of start-up so far", style="dim")
        elif s.warmup is not None and s.warmup.active:
            # No model update yet: shares of zero would read as measurements of the algorithm.
            exec_line.append(f" {warming_up(s.warmup)} ", style="bold reverse yellow")
            upd_line.append(" no model update yet: comm shares start after it", style="dim")
        else:
            exec_line.append(f" {percent(s.comm_share):>6} ", style="bold reverse red")
            exec_line.append(" comm / execution", style="bold")
            upd_line.append(f" {percent(s.comm_share_update):>6} ", style="bold reverse magenta")
            upd_line.append(" comm / model update", style="bold")
        seconds = Text(f"exec {s.exec_s:.1f} s  comm {s.comm_s:.1f} s  update {s.update_s:.1f} s",
                       style="dim", no_wrap=True, overflow="ellipsis")
        return [bar, legend, exec_line, upd_line, seconds]


SORTS = ("tree", "total", "p99", "count")


def phase_label(p: PhaseRow, names: set[str], tree: bool) -> str:
    """In tree order, show a phase under its nearest ancestor that is a row too."""
    if tree:
        parts = p.name.split("/")
        for cut in range(len(parts) - 1, 0, -1):
            if "/".join(parts[:cut]) in names:
                return "  " * cut + "/".join(parts[cut:])
    return p.name


def sort_phases(phases: list[PhaseRow], key: str) -> list[PhaseRow]:
    if key == "total":
        return sorted(phases, key=lambda p: -p.total_s)
    if key == "p99":
        return sorted(phases, key=lambda p: -(0.0 if math.isnan(p.p99_ms) else p.p99_ms))
    if key == "count":
        return sorted(phases, key=lambda p: -p.count)
    return sorted(phases, key=lambda p: p.name)  # `/` paths sort parents before children


class PhaseTable(Vertical):
    """Every phase: total, share, count, latency percentiles; `s` cycles the sort.

    Plain fixed-width lines rather than a DataTable: every cell changes at each refresh, and
    re-laying out a table four times a second was most of the app's own CPU time.
    """

    DEFAULT_CSS = """
    PhaseTable > #phase-head { height: 1; text-style: bold; background: $boost; }
    PhaseTable > VerticalScroll { height: 1fr; }
    PhaseTable Static { text-wrap: nowrap; text-overflow: ellipsis; }
    """
    COLUMNS = ("phase", "total s", "share", "count", "p50 ms", "p95 ms", "p99 ms")
    WIDTHS = (0, 9, 7, 8, 8, 8, 8)  # the phase column takes what is left
    snapshot: reactive[Snapshot | None] = reactive(None, always_update=True, repaint=False)
    sort_key: reactive[str] = reactive("tree")
    # The phase `f` profiles (↑/↓); None: the hottest that is not a wait (Snapshot.hottest_work).
    selected: reactive[str | None] = reactive(None)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cells: list[list[str]] = []  # what is on screen, for tests and the curious
        self._shown_choice: str | None = None

    def compose(self) -> ComposeResult:
        yield Lines(id="phase-head")
        with VerticalScroll():
            yield Lines(id="phase-body")

    def on_mount(self) -> None:
        self._title()

    def _title(self) -> None:
        self.border_title = f"Phases (sorted by {self.sort_key}; s to sort)"

    def cycle_sort(self) -> None:
        self.sort_key = SORTS[(SORTS.index(self.sort_key) + 1) % len(SORTS)]

    def watch_sort_key(self) -> None:
        self._title()
        self._fill()

    def watch_snapshot(self) -> None:
        self._fill()

    def watch_selected(self) -> None:
        self._fill()

    @property
    def selected_phase(self) -> str | None:
        names = [p.name for p in self.displayed()]
        if self.selected in names:
            return self.selected
        first = self.snapshot.hottest_work if self.snapshot else None
        return first.name if first else (names[0] if names else None)

    def move_selection(self, delta: int) -> None:
        names = [p.name for p in self.displayed()]
        if not names:
            return
        current = self.selected_phase
        i = names.index(current) if current in names else 0
        self.selected = names[(i + delta) % len(names)]
        self.query_one(VerticalScroll).scroll_to(y=max(0, names.index(self.selected) - 2), animate=False)

    def on_resize(self) -> None:
        self._fill()

    @property
    def row_count(self) -> int:
        return len(self.cells)

    def displayed(self) -> list[PhaseRow]:
        s = self.snapshot
        return sort_phases(s.phases, self.sort_key) if s else []

    def _line(self, cells: list[str], name_w: int) -> str:
        out = f"{cells[0][:name_w]:<{name_w}}"
        for c, w in zip(cells[1:], self.WIDTHS[1:], strict=True):
            out += f"{c:>{w}}"
        return out

    def _fill(self) -> None:
        s = self.snapshot
        if s is None or not self.is_mounted:
            return
        hottest = s.hottest
        names = {p.name for p in s.phases}
        # The selection is always highlighted: at first the hottest phase that is not a wait,
        # which the hottest (in red, often `sync/wait`) need not be.
        chosen = self.selected_phase
        self.cells = []
        for p in self.displayed():
            label = printable(phase_label(p, names, self.sort_key == "tree")) + (" ✉" if p.comm else "")
            self.cells.append([label, f"{p.total_s:.3f}", percent(p.share), str(p.count),
                               ms(p.p50_ms), ms(p.p95_ms), ms(p.p99_ms)])
        longest = max((len(c[0]) for c in self.cells), default=5)
        name_w = max(10, min(longest + 1, self.content_size.width - sum(self.WIDTHS) - 1))
        self.query_one("#phase-head", Lines).show(Text(self._line(list(self.COLUMNS), name_w)))
        body = []
        for p, cells in zip(self.displayed(), self.cells, strict=True):
            hot = hottest is not None and p.name == hottest.name
            style = "bold red" if hot else ("magenta" if p.comm else "")
            body.append(Text(self._line(cells, name_w), style=f"{style} reverse" if p.name == chosen else style,
                             no_wrap=True, overflow="ellipsis"))
        self.query_one("#phase-body", Lines).show(*body)
        order = [p.name for p in self.displayed()]
        scroll = self.query_one(VerticalScroll)
        if chosen != self._shown_choice and chosen in order and scroll.size.height > 0:
            self._shown_choice = chosen  # a new selection (at first: the default one) is scrolled into view
            row, rows = order.index(chosen), scroll.size.height
            if not scroll.scroll_offset.y <= row < scroll.scroll_offset.y + rows:
                scroll.scroll_to(y=max(0, row - rows // 2), animate=False)
        if hottest is not None:
            # Text, not a str: a str title is parsed as markup, and phase names come from the recording.
            # Whole percents: the row above gives the decimal; a new subtitle repaints the whole
            # panel, border and all, and a decimal that moves by 0.1 did that every few seconds.
            set_subtitle(self, Text(f"hottest: {printable(hottest.name)} {percent(hottest.share, decimals=0)}"))


class CoresPanel(Drawn, Static):
    """Per-core utilisation, who is pinned where, and each process's CPU and memory."""

    snapshot: reactive[Snapshot | None] = reactive(None, always_update=True, repaint=False)

    def on_mount(self) -> None:
        self.border_title = "Cores"

    def watch_snapshot(self) -> None:
        # Its height is `auto`: when the number of lines changes ("sampling…" -> one per core and
        # process) the repaint lays the screen out again, or the panel would stay one line tall.
        self.redraw_if_changed()

    def lines(self) -> list[Text]:
        s = self.snapshot
        if s is None or not s.cores_now:
            return [Text("sampling…", style="dim")]
        width = max(10, self.content_size.width)
        pinned: dict[int, list[str]] = {}
        for p in s.procs:
            if p.core is not None:
                pinned.setdefault(p.core, []).append(short_role(p.role))
        lines: list[Text] = []
        # Many cores: several bars per line rather than a panel taller than the screen.
        cell = 26
        per_line = max(1, width // cell) if len(s.cores_now) > 8 else 1
        bar_w = max(4, (width // per_line) - 20)
        line = Text(no_wrap=True, overflow="ellipsis")
        label_w = max(6, *(len(s.core_label(c)) + 1 for c in range(len(s.cores_now))))
        for core, util in enumerate(s.cores_now):
            style = "red" if util >= 90 else ("yellow" if util >= 60 else "green")
            line.append(f"{s.core_label(core):<{label_w}}", style="bold")
            line.append_text(hbar(util / 100, bar_w, style))
            line.append(f"{util:4.0f}% ")
            line.append(f"{','.join(pinned.get(core, []))[:7]:<7} ", style="cyan")
            if (core + 1) % per_line == 0:
                lines.append(line)
                line = Text(no_wrap=True, overflow="ellipsis")
        if line.plain:
            lines.append(line)
        for p in s.procs[:MAX_PROC_ROWS]:
            row = Text(no_wrap=True, overflow="ellipsis")
            core = s.core_label(p.core) if p.core is not None else (printable(p.node) if p.node else "-")
            cpu = f"{p.cpu_percent:.0f}%" if p.cpu_percent is not None else "-"
            row.append(f"{printable(p.role):<9}", style="bold")
            row.append(f" {core:<{label_w - 1}} {cpu:>5} CPU {human_bytes(p.rss_bytes):>9}")
            lines.append(row)
        if len(s.procs) > MAX_PROC_ROWS:
            lines.append(Text(f"… and {len(s.procs) - MAX_PROC_ROWS} more processes", style="dim"))
        return lines


class WorkerRow(Lines):
    """One process: state, iteration, own IPS; a crashed one shows its error."""

    DEFAULT_CSS = """
    WorkerRow { height: auto; text-wrap: nowrap; text-overflow: ellipsis; }
    WorkerRow.-stalled { background: $warning 20%; }
    WorkerRow.-crashed { background: $error 25%; }
    """
    row: reactive[ProcRow | None] = reactive(None, always_update=True, repaint=False)

    def watch_row(self, row: ProcRow | None) -> None:
        if row is None:
            return
        for state in STATE_STYLES:
            self.set_class(row.state == state, f"-{state}")
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{printable(row.role):<9}", style="bold")
        if row.node is not None:
            text.append(f"{printable(row.node):<8}", style="cyan")
        text.append(f"{printable(row.state):<9}", style=STATE_STYLES.get(row.state, ""))
        text.append(f"it {row.iterations:<6}{row.ips:5.2f} IPS")
        if row.error:
            self.show(text, Text(f"  {printable(row.error)}", style="red", no_wrap=True, overflow="ellipsis"))
        else:
            self.show(text)


# Processes shown one per line in the Workers and Cores panels; the rest are counted in a last
# line. A widget per process made a file naming hundreds of them take seconds to show.
MAX_PROC_ROWS = 64


class WorkersPanel(Vertical):
    snapshot: reactive[Snapshot | None] = reactive(None, always_update=True, repaint=False)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rows: dict[int, WorkerRow] = {}
        self._more: Lines | None = None

    def on_mount(self) -> None:
        self.border_title = "Workers"

    def watch_snapshot(self, s: Snapshot | None) -> None:
        if s is None:
            return
        new: list[Static] = []
        for p in s.procs[:MAX_PROC_ROWS]:
            w = self._rows.get(p.slot)
            if w is None:
                w = self._rows[p.slot] = WorkerRow(id=f"proc-{p.slot}")
                new.append(w)
            w.row = p
        hidden = len(s.procs) - MAX_PROC_ROWS
        if hidden > 0 and self._more is None:
            self._more = Lines(id="procs-more")
            new.append(self._more)
        if new:
            self.mount_all(new)
        if self._more is not None:
            self._more.show(Text(f"… and {hidden} more processes (marlwatch summary lists them all)",
                                   style="dim"))

"""The text charts' arithmetic, without an app."""

from __future__ import annotations

from marlwatch.app.charts import column_plot, hbar, stacked_widths


def test_stacked_widths_sum_and_order():
    assert stacked_widths([0.259, 0.124, 0.617, 0.0], 36) == [9, 5, 22, 0]
    for width in range(1, 120, 7):
        assert sum(stacked_widths([0.3333, 0.3333, 0.3334], width)) == width
    assert stacked_widths([0.5, 0.0], 10) == [5, 0]  # shares summing under 1 leave room
    assert stacked_widths([0, 0], 10) == [0, 0]


def test_hbar():
    assert hbar(1.0, 8, "red").plain == "█" * 8
    assert hbar(0.0, 4, "red").plain == "····"
    assert hbar(0.5, 4, "red").plain == "██··"
    assert len(hbar(0.37, 10, "red").plain) == 10


def test_column_plot_scales_to_max_newest_right():
    rows = column_plot([1.0, 2.0, 4.0], 5, 2)
    assert rows == ["    █", "  ▄██"]  # 4 is full height (16 eighths), 2 is half, 1 a quarter
    assert column_plot([3.0] * 10, 4, 1) == ["████"]  # only the newest 4 fit
    assert column_plot([], 3, 2) == ["   ", "   "]
    assert column_plot([0.0, 0.0], 2, 1) == ["  "]
    assert column_plot([1.0], 0, 3) == []


def test_line_strip_one_style_line_draws_as_rich_renders_it():
    """A line with no spans takes a short path (one segment): it must put the same characters
    with the same styles on screen as Rich's own rendering of it, padded or cut alike."""
    from rich.console import Console
    from rich.segment import Segment
    from rich.style import Style
    from rich.text import Text
    from textual.strip import Strip

    from marlwatch.app.widgets import line_strip

    console = Console(width=80)
    base = Style(color="white", bgcolor="grey11")

    def through_rich(text: Text, width: int) -> Strip:
        if text.cell_len > width:
            text = text.copy()
            text.truncate(width, overflow=text.overflow or "ellipsis")
        style = base + console.get_style(text.style) if text.style else base
        return Strip(Segment.apply_style(text.render(console), style), text.cell_len).extend_cell_length(width, base)

    def cells(strip: Strip) -> list[tuple[str, Style | None]]:
        return [(ch, seg.style) for seg in strip for ch in seg.text]

    cases = [Text("▁▂▃█ plot row", style="green"), Text("sample/env_step   1.234  41.5%"), Text(""),
             Text("a very long phase name that does not fit", style="bold red reverse", overflow="ellipsis"),
             Text("wide 全角 cells", style="magenta"), Text("x" * 30, overflow="crop")]
    for text in cases:
        assert not text.spans
        for width in (1, 5, 12, 40):
            fast, slow = line_strip(text, width, base, console), through_rich(text, width)
            assert fast.cell_length == slow.cell_length == width, (text, width)
            assert cells(fast) == cells(slow), (text, width)

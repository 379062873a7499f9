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

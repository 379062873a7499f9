"""Small text charts (Rich renderables and the arithmetic behind them); no Textual here."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

BLOCKS = " ▏▎▍▌▋▊▉█"


def stacked_widths(shares: Sequence[float], width: int) -> list[int]:
    """Cell widths of stacked segments: proportional, summing to `width` when shares sum to 1.

    Largest remainders get the leftover cells, so a 1-cell rounding never hides a segment
    bigger than another one shown.
    """
    if width <= 0 or not shares:
        return [0] * len(shares)
    total = sum(max(0.0, s) for s in shares)
    if total <= 0:
        return [0] * len(shares)
    fill = round(width * min(total, 1.0))
    exact = [max(0.0, s) / total * fill for s in shares]
    cells = [int(e) for e in exact]
    order = sorted(range(len(shares)), key=lambda i: exact[i] - cells[i], reverse=True)
    for i in order[: fill - sum(cells)]:
        cells[i] += 1
    return cells


def stacked_bar(parts: Sequence[tuple[float, str]], width: int) -> Text:
    """One line of coloured segments, one per (share, style)."""
    text = Text(no_wrap=True, overflow="crop")
    widths = stacked_widths([s for s, _ in parts], width)
    for (_, style), w in zip(parts, widths, strict=True):
        text.append("█" * w, style=style)
    used = sum(widths)
    if used < width:
        text.append("░" * (width - used), style="dim")
    return text


def hbar(fraction: float, width: int, style: str) -> Text:
    """A horizontal bar with eighth-cell resolution, padded to `width`."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    text = Text("█" * full, style=style, no_wrap=True)
    if rest and full < width:
        text.append(BLOCKS[rest], style=style)
        full += 1
    text.append("·" * (width - full), style="dim")
    return text


VBLOCKS = " ▁▂▃▄▅▆▇█"


def column_plot(values: Sequence[float], width: int, height: int) -> list[str]:
    """Rows (top first) of a bar-per-column plot of the newest `width` values, scaled to the max.

    Newest at the right; columns without data stay blank. Eighth-cell vertical resolution.
    """
    if width <= 0 or height <= 0:
        return []
    vals = list(values[-width:])
    top = max(vals, default=0.0)
    eighths = [round(v / top * height * 8) if top > 0 else 0 for v in vals]
    pad = " " * (width - len(vals))
    rows = []
    for r in range(height):
        floor = (height - 1 - r) * 8
        rows.append(pad + "".join(VBLOCKS[min(8, max(0, e - floor))] for e in eighths))
    return rows

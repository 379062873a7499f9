"""Reading the stored samples back (`marlwatch flame`), and drawing them: top functions as text,
speedscope JSON, an SVG flame graph."""

from __future__ import annotations

import html
import json
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from marlwatch.metrics import function_name, in_phase, top_segment
from marlwatch.recording import EVENT, STACK, Recording
from marlwatch.report import percent
from marlwatch.terminal import printable


@dataclass
class StackRead:
    """What a recording holds for `marlwatch flame --phase P`."""

    stacks: Counter  # folded stack -> samples taken while P (or a phase below it) ran
    per_slot: dict[int, Counter]  # the same, per process
    by_phase: Counter  # every stored sample's attributed phase -> samples (any phase)
    events: list[tuple[str, dict[str, Any]]]  # flame_* events (name, detail), in order


def read_stacks(rec: Recording, phase: str) -> StackRead:
    """The samples of `phase` and what was captured besides. Streams the recording batch by batch."""
    out = StackRead(Counter(), defaultdict(Counter), Counter(), [])
    for batch in rec.batches():
        kind = batch.column("kind")
        events = batch.filter(pc.equal(kind, EVENT))
        for slot, name, text in zip(*(events.column(c).to_pylist() for c in ("proc", "name", "text")), strict=True):
            if name and name.startswith("flame_"):
                try:
                    detail = json.loads(text or "{}")
                except ValueError:
                    detail = {}
                out.events.append((name, {"slot": slot, **(detail if isinstance(detail, dict) else {})}))
        stacks = batch.filter(pc.equal(kind, STACK))
        for slot, name, stack, count in zip(*(stacks.column(c).to_pylist()
                                              for c in ("proc", "name", "text", "value")), strict=True):
            out.by_phase[name] += int(count)
            if in_phase(name, phase):
                out.stacks[stack] += int(count)
                out.per_slot[int(slot)][stack] += int(count)
    out.per_slot = dict(out.per_slot)
    return out


def no_samples_reason(path: str, phase: str, read: StackRead, roles: dict[str, str]) -> str:
    """Why `read` has no samples of `phase`: what was captured instead, and what to try."""
    if not read.by_phase:
        said = []
        for name, d in read.events:
            if name == "flame_failed":
                role = roles.get(str(d.get("slot")), "a process")
                said.append(f"py-spy could not profile {role} (pid {d.get('pid')}): {d.get('error')}")
            elif name == "flame_skipped":
                said.append(f"'{d.get('phase')}' was not profiled: {d.get('reason')}")
        started = sum(1 for name, _ in read.events if name == "flame_started")
        done = sum(1 for name, _ in read.events if name == "flame_done")
        if started > done:
            said.append("a capture started but the run ended before its samples were stored")
        if said:
            return f"{path} holds no py-spy samples: " + "; ".join(dict.fromkeys(said))
        return (f"{path} holds no py-spy samples: it was recorded without --flame or --auto-flame "
                f"(e.g. `marlwatch run --flame {phase}:5` takes some)")
    total = sum(read.by_phase.values())
    ranked = sorted(read.by_phase.items(), key=lambda kv: (-kv[1], kv[0]))
    where = ", ".join(f"{name} {n}" for name, n in ranked[:4]) + (", ..." if len(ranked) > 4 else "")
    requested = list(dict.fromkeys(str(d.get("phase")) for name, d in read.events if name == "flame_started"))
    notes = [f"py-spy ran for {', '.join(repr(p) for p in requested)}"] if requested else []
    notes += [f"'{d.get('phase')}' was not profiled: {d.get('reason')}" for name, d in read.events
              if name == "flame_skipped" and d.get("phase") == phase]
    # The phase py-spy was asked for, where it has samples; else the top level of the biggest.
    tries = [p for p in requested if any(in_phase(name, p) for name in read.by_phase)] \
        or [top_segment(ranked[0][0])]
    return (f"{path}: no py-spy samples were taken while '{phase}' ran; the file's {total} samples are in "
            f"{where}" + (f" ({'; '.join(notes)})" if notes else "") + f"; try --phase {tries[0]}")


def _frames(stack: str) -> list[str]:
    return stack.split(";")


def by_function(stacks: Counter) -> Counter:
    """Frames merged by function: `f (x.py:12);g (y.py:3)` -> `f (x.py);g (y.py)`, the frame
    names of py-spy's own `--nolineno` output. Samples recorded on different lines of one
    function add up into one frame of the flame graph."""
    out: Counter = Counter()
    for stack, count in stacks.items():
        out[";".join(function_name(fr) for fr in _frames(stack))] += count
    return out


def top_functions_text(stacks: Counter, phase: str, n: int = 25) -> str:
    """Functions (or, for stacks with lines, source lines) ranked by self then total samples."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    total = sum(stacks.values())
    for stack, count in stacks.items():
        frames = _frames(stack)
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"phase {phase}: {total} samples", "",
             f"{'self':>7} {'self%':>6} {'total':>7} {'total%':>6}  function"]
    ranked = sorted(incl, key=lambda f: (-self_c[f], -incl[f], f))[:n]
    for f in ranked:
        lines.append(f"{self_c[f]:7d} {percent(self_c[f] / total, 5)} {incl[f]:7d} {percent(incl[f] / total, 5)}  {f}")
    return "\n".join(printable(line) for line in lines)  # frames come from the recording


def speedscope(per_slot: dict[int, Counter], phase: str, roles: dict[str, str]) -> dict[str, Any]:
    frames: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    profiles = []
    for slot in sorted(per_slot):
        samples, weights = [], []
        for stack, count in per_slot[slot].items():
            ids = []
            for fr in _frames(stack):
                if fr not in index:
                    name, _, where = fr.partition(" (")
                    file, _, line = where.rstrip(")").rpartition(":")
                    entry: dict[str, Any] = {"name": name, "file": file or where.rstrip(")")}
                    if line.isdigit():
                        entry["line"] = int(line)
                    index[fr] = len(frames)
                    frames.append(entry)
                ids.append(index[fr])
            samples.append(ids)
            weights.append(count)
        profiles.append({"type": "sampled", "name": f"{roles.get(str(slot), f'slot {slot}')}: {phase}",
                         "unit": "none", "startValue": 0, "endValue": sum(weights), "samples": samples,
                         "weights": weights})
    return {"$schema": "https://www.speedscope.app/file-format-schema.json", "shared": {"frames": frames},
            "profiles": profiles, "name": f"marlwatch flame: {phase}", "activeProfileIndex": 0,
            "exporter": "marlwatch"}


def _svg_text(text: str) -> str:
    """Recorded text as SVG character data: control characters are not allowed in XML at all."""
    return html.escape(printable(text))


def flame_svg(stacks: Counter, title: str, width: int = 1200, row: int = 17) -> str:
    """A flame graph (root at the bottom) as a self-contained SVG with hover titles."""
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for stack, count in stacks.items():
        node = tree
        node["n"] += count
        for fr in _frames(stack):
            node = node["kids"].setdefault(fr, {"n": 0, "kids": {}})
            node["n"] += count

    def depth(node: dict[str, Any]) -> int:
        return 1 + max((depth(k) for k in node["kids"].values()), default=0)

    levels = depth(tree)
    height = (levels + 2) * row
    total = max(1, tree["n"])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           f'<text x="4" y="{row - 4}" font-size="13">{_svg_text(title)} ({total} samples)</text>']

    def draw(name: str, node: dict[str, Any], x: float, level: int) -> None:
        w = node["n"] / total * width
        if w < 0.5:
            return
        y = height - (level + 1) * row
        hue = 20 + (zlib.crc32(name.encode()) % 40)  # the same colour for a function in every file
        label = _svg_text(name)
        out.append(f'<g><title>{label}: {node["n"]} samples ({percent(node["n"] / total)})</title>'
                   f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.5):.1f}" height="{row - 1}" '
                   f'fill="hsl({hue},85%,60%)"/>')
        chars = int(w / 7)
        if chars >= 4:
            text = name if len(name) <= chars else name[:chars - 2] + ".."
            out.append(f'<text x="{x + 3:.1f}" y="{y + row - 5}">{_svg_text(text)}</text>')
        out.append("</g>")
        cx = x
        for kid_name, kid in sorted(node["kids"].items()):
            draw(kid_name, kid, cx, level + 1)
            cx += kid["n"] / total * width

    cx = 0.0
    for name, kid in sorted(tree["kids"].items()):
        draw(name, kid, cx, 0)
        cx += kid["n"] / total * width
    out.append("</svg>")
    return "\n".join(out)


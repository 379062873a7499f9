"""Layout pinned with pytest-textual-snapshot: replay of the shipped recording, paused at 20 s.

Nothing on screen depends on the wall clock: the playhead is fixed and the header shows the
recording's time. Update after an intended change with `pytest --snapshot-update`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from marlwatch.app.replay import ReplayApp
from marlwatch.cli.files import load_replay as load

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"
FLAMED = REPO / "recordings" / "maddpg-flame.arrow"  # with py-spy samples of `update` and `sample`


def paused_replay() -> ReplayApp:
    playback, status, size = load(str(SHIPPED))
    return ReplayApp(playback, "recordings/maddpg-3agents-2workers.arrow", size, status, at_s=20.0, play=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_replay_layout(snap_compare, size):
    assert snap_compare(paused_replay(), terminal_size=size)


@pytest.mark.timeout(60)
def test_replay_sorted_at_end(snap_compare):
    assert snap_compare(paused_replay(), press=["end", "s"], terminal_size=(100, 30))


@pytest.mark.timeout(60)
def test_replay_with_the_py_spy_panel_at_80x24(snap_compare):
    # The panel open on the first selection (the hottest phase that is not a wait, highlighted):
    # the phase table keeps 5 rows; Cores and Workers give their place to the panel (t brings them back).
    playback, status, size = load(str(FLAMED))
    app = ReplayApp(playback, "recordings/maddpg-flame.arrow", size, status, at_s=10_000, play=False)
    assert snap_compare(app, terminal_size=(80, 24))

"""Every custom message of the app, in one place.

The live reader thread posts `SnapshotUpdate` a few times a second; a newer one replaces a stale
one still queued, so a busy UI never works through a backlog of old figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from marlwatch.metrics import Snapshot


@dataclass
class SnapshotUpdate(Message):
    """New figures for the panels."""

    snapshot: Snapshot
    recording_bytes: int

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotUpdate)


@dataclass
class RunEnded(Message):
    """The run's processes are gone and the recording is closed."""

    snapshot: Snapshot
    recording_bytes: int
    failure: str | None
    reason: str | None

"""A watched process's states, and the one rule for how its lifecycle events move them.

The monitor applies the rule as events happen (and records them as `event` rows); `Metrics`
applies it to the same rows read back, so the live view, a replay and `summary` agree.

    starting --started--> running --finished / crashed / stopped--> that state (final)
                                  --left--> left (closed its connection; processes that connected by themselves)
                                  --exited--> finished (status 0), crashed (another status),
                                              exited (gone, status unknown: not the launcher's child)
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

# What a user sends to stop a run: Ctrl-C, `kill`/`timeout`/a job scheduler, a closed terminal or
# SSH session. The monitor handles them; its children ignore them (marlwatch.process).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

STARTING, RUNNING = "starting", "running"
# What the process itself (or its exit status) says: nothing changes these afterwards.
FINAL = frozenset({"finished", "crashed", "stopped"})
ENDED = FINAL | {"left", "exited"}


def exit_state(exitcode: int | None) -> str:
    """The state an exit status means: 0 finished, unknown (not our child) exited, else crashed."""
    if exitcode == 0:
        return "finished"
    return "exited" if exitcode is None else "crashed"


def after(state: str, error: str | None, event: str, detail: Mapping[str, Any]) -> tuple[str, str | None]:
    """A process's (state, error) after lifecycle `event` with `detail` (other events change nothing).

    `exited` takes its state from `detail["state"]` (what the monitor recorded) or else from
    `detail["exitcode"]`, and only changes a state that is not final yet."""
    if event == "started":
        # A process stopped by its launcher while starting may still have sent its hello.
        return (RUNNING, error) if state not in ENDED else (state, error)
    if event == "crashed":
        return "crashed", str(detail.get("error") or "unknown error")
    if event in FINAL:
        return event, error
    if event == "left":
        return ("left", error) if state not in ENDED else (state, error)
    if event == "exited" and state not in FINAL:
        new = detail.get("state")
        new = new if isinstance(new, str) else exit_state(detail.get("exitcode"))
        if new == "crashed" and detail.get("error"):
            error = str(detail["error"])  # killed from outside: the monitor's reason
        return new, error
    return state, error

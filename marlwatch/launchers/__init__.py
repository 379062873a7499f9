"""Launchers: what starts, stops and supervises the processes a monitor watches.

A launcher never reads telemetry. It reserves a monitor slot for each process it starts (the
first slot is the run's main process: its iterations are the run's), attaches the telemetry pipes
it made, and reports what happened to its processes (`Monitor.process_exited`). `marlwatch listen`
is a monitor with no launcher.
"""

from __future__ import annotations

import signal
from typing import Any, Protocol

from marlwatch.monitor import Monitor
from marlwatch.recording import RunInfo


def exit_reason(code: int | None) -> str:
    """How a process ended, from its exit status, for the user: `was killed by SIGKILL`."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LaunchError(Exception):
    """A launcher that cannot start because of what it was asked (a command that does not exist):
    bad input, the message is one line for the user."""


class StartFailed(Exception):
    """The machine would not start the processes (a process or open-file limit, memory): the run
    fails; the message names what could not start and the likely limit."""


class Launcher(Protocol):
    def run_info(self) -> RunInfo:
        """What the recording's metadata says about this run (before anything starts)."""
        ...

    def describe(self) -> str:
        """One line for the user: what runs (`maddpg on simple_spread, 3 agents, 2 workers`)."""
        ...

    def record_stem(self) -> str:
        """The start of the default recording name (``maddpg``, ``python-train``)."""
        ...

    def start(self, monitor: Monitor) -> None:
        """Start the processes (raises LaunchError or OSError if it cannot)."""
        ...

    def waitables(self) -> list[Any]:
        """Objects to wake the monitor's pump when a process ends (process sentinels)."""
        ...

    def poll(self, monitor: Monitor, ready: list[Any]) -> None:
        """Report processes that ended (some of `ready` are theirs) to the monitor."""
        ...

    @property
    def running(self) -> bool: ...

    def request_stop(self, reason: str) -> None:
        """Ask the processes to stop cleanly (idempotent)."""
        ...

    def kill(self, monitor: Monitor) -> None:
        """End whatever still runs (the grace period is over); nothing may outlive the run."""
        ...

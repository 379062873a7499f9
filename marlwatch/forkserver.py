"""What the run's fork server loads once, so each learner and worker starts without importing.

The built-in launchers start their children from a multiprocessing fork server
(`BuiltinLauncher`): a clean process started by the monitor, which imports this module once and
then forks every child from itself. A spawned child imported torch on its own (about 1.5 s of
CPU each, three times for a learner and two workers, on cores the run already needs); a forked
one has it. The server forks from one thread and has not used torch, so its children start as
clean as spawned ones.

The server lives in the monitor's process group: a SIGTERM or SIGHUP sent to the whole group
(`timeout`, a closed terminal) must not kill it, because its children die with it (they ask
for SIGKILL when their parent dies: marlwatch.process) and only the monitor decides how a run
stops. It ignores both, as multiprocessing makes it ignore SIGINT; it ends when the monitor
does (the end of its pipe from the monitor).
"""

from __future__ import annotations

import os
import signal
import sys

import torch  # noqa: F401  - the point of this module: imported once, in the server

import algorithms  # noqa: F401
import marlwatch.process  # noqa: F401

SERVER_PID = os.getpid()  # in every child forked from here: the parent it must have (marlwatch.process)

for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_IGN)


def _quiet(*exc_info: object) -> None:
    """The server dies of what stops a child from starting (no process or file left under the
    user's limits) with multiprocessing's traceback; the monitor says it in one line."""


sys.excepthook = _quiet  # the children put Python's back (marlwatch.process)

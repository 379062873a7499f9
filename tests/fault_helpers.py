"""Code that fault tests run in child processes (spawned children import it by name)."""

from __future__ import annotations

import os
import time


def flood(conn, seconds: float, report) -> None:
    """Emit spans through the real span API as fast as possible for `seconds`, then report
    how many were sent and how long the sends blocked in total."""
    from marlwatch import instrument

    tel = instrument.connect(conn, role="producer", slot=1, pid=os.getpid())
    outer, inner = tel.span("sample"), tel.span("sample/env_step")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(200):
            with outer:
                with inner:
                    pass
        tel.tick()
    tel.flush()
    import psutil

    report.send((tel.spans_sent, psutil.Process().memory_info().rss))
    tel.close()

"""marlwatch: see where the time of a multi-agent RL training run goes.

The span API for training loops (see marlwatch.instrument):

    import marlwatch
    with marlwatch.span("update/comm/gnn"): ...
    marlwatch.tick()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["connect", "counter", "disconnect", "gauge", "phase", "span", "spans_off", "telemetry", "tick"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from marlwatch.instrument import (
        connect,
        counter,
        disconnect,
        gauge,
        phase,
        span,
        spans_off,
        telemetry,
        tick,
    )


def __getattr__(name: str) -> Any:
    # The span API is imported on first use, not with the package: `marlwatch` the command
    # then starts in its own `main()` (which turns a Ctrl-C into one line and exit 130) before
    # numpy is loaded, instead of spending ~0.1 s where a Ctrl-C printed a traceback.
    if name in __all__:
        from marlwatch import instrument

        value = getattr(instrument, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'marlwatch' has no attribute {name!r}")

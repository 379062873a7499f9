"""marlwatch: see where the time of a multi-agent RL training run goes.

The span API for training loops (see marlwatch.instrument):

    import marlwatch
    with marlwatch.span("update/comm/gnn"): ...
    marlwatch.tick()

In a process whose environment has MARLWATCH_ADDRESS (set by `marlwatch run -- COMMAND`, or
exported as `marlwatch listen` prints), the first span, tick, gauge or counter connects to
that monitor; without it they cost almost nothing and record nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__all__ = ["auto_phases", "autostart_dir", "ray_env", "connect", "counter", "disconnect", "gauge", "phase", "span",
           "spans_off", "telemetry", "tick", "warmup"]
_SPAN_API = frozenset(__all__) - {"auto_phases", "autostart_dir", "ray_env"}  # loaded from marlwatch.instrument
__version__ = "0.1.0"


def autostart_dir() -> str:
    """The directory to put first on PYTHONPATH of a command to watch: its `sitecustomize`
    installs the auto phases and connects on first use in every Python process the command
    starts, whether or not that process imports marlwatch. It does nothing in a process whose
    environment has no MARLWATCH_ADDRESS, and chains to any other `sitecustomize` on sys.path."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_autostart")


def ray_env() -> dict[str, str]:
    """The MARLWATCH_* variables of this process, to hand to a Ray program's actors where they do
    not inherit them (a cluster): ``ray.init(runtime_env={"env_vars": marlwatch.ray_env()})``.
    Empty when no monitor watches this process. docs/distributed.md."""
    names = ("MARLWATCH_ADDRESS", "MARLWATCH_AUTHKEY", "MARLWATCH_AUTO_PHASES", "MARLWATCH_SPANS_ENABLED")
    return {k: os.environ[k] for k in names if k in os.environ}


def auto_phases() -> None:
    """Record phases without code changes (env steps, backward passes, optimizer steps,
    torch.distributed collectives, and iterations): see marlwatch.autophases."""
    from marlwatch import autophases, instrument

    autophases.install(lambda: instrument)

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
        warmup,
    )


def __getattr__(name: str) -> Any:
    # The span API is imported on first use, not with the package: `marlwatch` the command
    # then starts in its own `main()` (which turns a Ctrl-C into one line and exit 130) before
    # numpy is loaded, instead of spending ~0.1 s where a Ctrl-C printed a traceback.
    if name in _SPAN_API:
        from marlwatch import instrument

        value = getattr(instrument, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'marlwatch' has no attribute {name!r}")

"""marlwatch: see where the time of a multi-agent RL training run goes.

The span API for training loops (see marlwatch.instrument):

    import marlwatch
    with marlwatch.span("update/comm/gnn"): ...
    marlwatch.tick()
"""

from marlwatch.instrument import connect, counter, disconnect, gauge, phase, span, spans_off, telemetry, tick

__all__ = ["connect", "counter", "disconnect", "gauge", "phase", "span", "spans_off", "telemetry", "tick"]
__version__ = "0.1.0"

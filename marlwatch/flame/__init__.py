"""py-spy flame graphs tied to phases (format and clock alignment: docs/flame.md).

While a run is going, a `FlameController` (controller.py) runs `py-spy record --format
chrometrace --idle` (pyspy.py) for a few seconds on exactly the processes that execute a phase,
once the phase does real work (marlwatch.phase_activity), or when the auto trigger fires (auto.py).
It rebuilds every stack sample from py-spy's timestamped trace, aligns py-spy's clock with the
run's and attributes each sample to the innermost span open in that process at that moment
(align.py), and writes the samples into the recording as rows of kind `stack`:

    kind="stack", proc=slot, name=attributed phase, t_ns=first sample, dur_ns=time covered,
    iter=the span's iteration, value=number of samples, text=folded stack (root first, ";")

Consecutive samples with the same stack in the same span share one row. `Metrics` keeps, per
phase, the leaf functions of these rows (the live app's py-spy panel); `marlwatch flame FILE
--phase P` renders only the samples taken while P (or a phase under it) ran (render.py): text
(top functions), speedscope JSON or an SVG flame graph.

Where py-spy cannot attach (no permission, process gone, py-spy missing) the run goes on; the
controller writes a `flame_failed` event and a one-line message.
"""

DEFAULT_SECONDS = 5.0
DEFAULT_RATE = 100
# A capture keeps the sampled processes' spans of its window in memory until the samples are
# attributed: a minute of even fine-grained spans stays in the tens of MB.
MAX_SECONDS = 60

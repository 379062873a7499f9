"""The Textual app: `marlwatch run` (live) and `marlwatch replay` show the same panels."""

# Redraws per second of the live view (`--refresh`): every 2 s, as btop (htop 1.5 s, top 3 s).
# Each redraw is Textual composing the lines that changed, the bulk of the app's CPU, and that CPU
# is taken from the run it watches: every 2 s the UI thread costs 0.1-0.3 points of a core less
# than at 1 Hz (bench/app_threads.py; docs/benchmarks.md §6); `--refresh 1` is there for whoever
# wants it. Here, not in base.py, so that building the command line does not import Textual.
REFRESH_HZ = 0.5
# Replay's playback steps: a replay charges no run, and a playhead that moves once a second reads
# smoothly at 1x and at 16x alike.
REPLAY_HZ = 1.0

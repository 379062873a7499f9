"""The Textual app: `marlwatch run` (live) and `marlwatch replay` show the same panels."""

# Redraws per second of the live view and replay (`--refresh`). One, as py-spy top (1 s; htop 1.5 s,
# btop 2 s): what the panels show changes once a second (the IPS history gains a column, the clock
# a second), and each redraw is Textual composing the screen, the bulk of the app's CPU. Two cost
# the run twice the drawing (docs/benchmarks.md §6). Here, not in base.py, so that building the
# command line does not import Textual.
REFRESH_HZ = 1.0

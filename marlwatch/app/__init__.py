"""The Textual app: `marlwatch run` (live) and `marlwatch replay` show the same panels."""

# Redraws per second of the live view and replay (`--refresh`). Two, as the terminal monitors
# users keep open beside a run refresh (py-spy top 1 s, htop 1.5 s, btop 2 s): four cost the run
# twice the drawing for figures nobody reads four times a second (docs/benchmarks.md §6). Here,
# not in base.py, so that building the command line does not import Textual.
REFRESH_HZ = 2.0

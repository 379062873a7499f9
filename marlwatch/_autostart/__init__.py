"""Not imported as a package: this directory goes first on PYTHONPATH of a watched command (see
`marlwatch.autostart_dir()`), so that its `sitecustomize` runs at every Python start-up."""

"""The Textual app: `marlwatch run` (live) and `marlwatch replay` show the same panels."""

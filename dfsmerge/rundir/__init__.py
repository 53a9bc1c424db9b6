"""The run directory of a search: its lock and its readers."""

"""The `genworker` command line."""

"""The simulated image provider: a real HTTP server for demos, tests and benchmarks.
Nothing but the CLI and the tests import it."""

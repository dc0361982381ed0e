"""`python -m genworker.cli`: the same as the `genworker` command."""

from genworker.cli.main import main

raise SystemExit(main())

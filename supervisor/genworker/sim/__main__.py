"""`python -m genworker.sim`: the simulated image API."""

from genworker.sim.server import main

raise SystemExit(main())

"""The chaos run's options, and the integration harness on the import path (the chaos
run drives real nodes with it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

SHORT_JOBS = 800  # the CI run: well under two minutes on two cores


def pytest_addoption(parser: pytest.Parser) -> None:
    # Only seen when tests/chaos is on the command line (pytest reads the options of the
    # conftest files it starts from); GENWORKER_CHAOS_JOBS works from anywhere.
    parser.addoption(
        "--chaos-jobs",
        type=int,
        default=None,
        help="jobs the chaos run drains (default $GENWORKER_CHAOS_JOBS, else the short run)",
    )
    parser.addoption(
        "--chaos-seed",
        type=int,
        default=None,
        help="seed of the chaos run's moments and faults (default $GENWORKER_CHAOS_SEED, else 1)",
    )


def jobs_wanted(config: pytest.Config) -> int:
    flag = config.getoption("--chaos-jobs", default=None)
    return int(flag or os.environ.get("GENWORKER_CHAOS_JOBS") or SHORT_JOBS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The run bounds itself by its deadline; pytest's own timeout (300 s) must not cut a
    # long run short, only one whose driver is stuck past it.
    from chaos import deadline_for

    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.timeout(deadline_for(jobs_wanted(config)) + 300))


@pytest.fixture
def chaos_jobs(request: pytest.FixtureRequest) -> int:
    return jobs_wanted(request.config)


@pytest.fixture
def chaos_seed(request: pytest.FixtureRequest) -> int:
    flag = request.config.getoption("--chaos-seed", default=None)
    return int(flag if flag is not None else os.environ.get("GENWORKER_CHAOS_SEED") or 1)

"""The handler registry: built-ins, dotted-path handlers, and one-line errors for bad ones."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from genworker.api.openai import ImageHandler
from genworker.config import ConfigError, Settings
from genworker.model import Job, PermanentError
from genworker.worker.handlers import load_handlers

JOB = Job(1, 1, 1, 0, "echo", {"prompt": "p"}, 1)

PLUGIN = """
async def echo(job, session):
    return {"prompt": job.params["prompt"]}

async def not_a_dict(job, session):
    return ["a", "list"]

async def not_json(job, session):
    return {"when": object()}

async def not_a_number(job, session):
    return {"score": float("nan")}

async def with_nul(job, session):
    return {"text": "a\\x00b"}

def sync_one(job, session):
    return {}

class Handlers:
    async def method(self, job, session):
        return {}

class Callable:
    async def __call__(self, job, session):
        return {"called": True}

instance = Callable()
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "gw_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "gw_test_plugin"
    sys.modules.pop("gw_test_plugin", None)


def run(handler: Any, job: Job = JOB) -> Any:
    return asyncio.run(handler(job, None))


def test_builtins_are_image_and_noop() -> None:
    handlers = load_handlers(Settings(api_url="http://127.0.0.1:1"))
    assert set(handlers) == {"image", "noop"}
    assert run(handlers["noop"]) == {}
    assert isinstance(handlers["image"].__wrapped__, ImageHandler)  # type: ignore[attr-defined]


def test_image_jobs_without_an_api_url_fail_as_jobs() -> None:
    handlers = load_handlers(Settings())
    with pytest.raises(PermanentError, match="--api-url"):
        run(handlers["image"])


def test_dotted_path_handlers_load(plugin: str) -> None:
    entries = (f"echo={plugin}:echo", f"call={plugin}:instance", f"noop={plugin}:echo")
    handlers = load_handlers(Settings(handlers=entries))
    assert run(handlers["echo"]) == {"prompt": "p"}
    assert run(handlers["call"]) == {"called": True}
    assert run(handlers["noop"]) == {"prompt": "p"}  # an entry may replace a built-in


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("echo", "write kind=pkg.module:func"),
        ("Echo=x:y", "bad handler kind"),
        ("my-kind=x:y", "bad handler kind"),  # submit_task would refuse every job of it
        ("a.b=x:y", "bad handler kind"),
        (f"{'k' * 33}=x:y", "bad handler kind"),
        ("x=no_such_module_gw:f", "cannot import no_such_module_gw"),
        ("x={plugin}:missing", "has no missing"),
        ("x={plugin}:sync_one", "not an async function"),
        ("x={plugin}:Callable", "not an async function"),
        ("x={plugin}", "is not pkg.module:func"),
    ],
)
def test_bad_entries_are_one_line_config_errors(plugin: str, entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_handlers(Settings(handlers=(entry.format(plugin=plugin),)))
    assert "\n" not in str(caught.value)


def test_a_kind_defined_twice_is_refused(plugin: str) -> None:
    with pytest.raises(ConfigError, match="twice"):
        load_handlers(Settings(handlers=(f"a={plugin}:echo", f"a={plugin}:echo")))


def test_a_handler_returning_a_non_dict_fails_its_job(plugin: str) -> None:
    handlers = load_handlers(
        Settings(handlers=(f"bad={plugin}:not_a_dict", f"obj={plugin}:not_json"))
    )
    with pytest.raises(PermanentError, match="returned list, not a dict"):
        run(handlers["bad"])
    with pytest.raises(PermanentError, match="not JSON"):
        run(handlers["obj"])


def test_a_result_postgresql_cannot_store_fails_its_job(plugin: str) -> None:
    handlers = load_handlers(
        Settings(handlers=(f"nan={plugin}:not_a_number", f"nul={plugin}:with_nul"))
    )
    with pytest.raises(PermanentError, match="cannot be stored: not JSON"):
        run(handlers["nan"])
    with pytest.raises(PermanentError, match="cannot be stored: a NUL character"):
        run(handlers["nul"])

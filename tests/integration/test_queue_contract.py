"""What a submit may ask of a node: the model's contract (the same rule and the same words
as `contract.option_problem`), the plan's models, the size of params and of a bulk call,
a tenant's unfinished tasks, and an idempotency key reused for another request. Every
refusal is one line with its SQLSTATE and writes nothing."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from contract_cases import REFUSED_OPTIONS
from genworker import errors
from genworker.config import Settings
from genworker.config_values import parse_plans
from genworker.contract import MODELS, TASK_OPTIONS, option_problem
from genworker.queue import schema
from genworker.queue.client import Client
from psycopg.types.json import Jsonb
from queue_support import counts


def refused(conn: psycopg.Connection, sql: str, *args: Any) -> psycopg.Error:
    """Run a statement that must fail; returns the error, having checked nothing was written."""
    before = counts(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(sql, args)
    assert counts(conn) == before
    message = caught.value.diag.message_primary or ""
    assert message
    assert "\n" not in message
    return caught.value


def submit_sql(conn: psycopg.Connection, plan: str, params: dict[str, Any], *rest: Any) -> Any:
    marks = ", ".join(["%s", "%s"] + ["%s"] * len(rest))
    return conn.execute(
        f"SELECT genworker.submit_task({marks})", (plan, Jsonb(params), *rest)
    ).fetchone()


# ------------------------------------------------------------------ the model's contract


@pytest.mark.parametrize(("model", "params", "words"), REFUSED_OPTIONS)
def test_the_database_refuses_what_option_problem_names_in_its_words(
    conn: psycopg.Connection, model: str, params: dict[str, Any], words: str
) -> None:
    expected = option_problem(model, params)
    assert expected is not None
    error = refused(
        conn,
        "SELECT genworker.submit_task('free', %s)",
        Jsonb({"prompt": "a lighthouse", "model": model, **params}),
    )
    assert error.sqlstate == ("GW003" if "size" in params else "GW008")
    assert error.diag.message_primary == expected


def test_the_client_raises_invalid_option(conn: psycopg.Connection, client: Client) -> None:
    with pytest.raises(errors.InvalidOption) as caught:
        client.submit("free", "a cat", params={"model": "dall-e-3", "background": "opaque"})
    assert caught.value.exit_code == 2
    assert caught.value.code == "GW008"
    assert counts(conn) == (0, 0)


@pytest.mark.parametrize(
    "params",
    [
        {"quality": "low", "size": "auto", "output_compression": 0, "moderation": "low"},
        {"model": "dall-e-3", "style": "natural", "quality": "hd", "size": "1792x1024"},
        {"model": "dall-e-2", "size": "256x256", "quality": "standard"},
        {"model": "flux-pro", "size": "777x333"},  # an unknown model without options passes
    ],
)
def test_what_a_model_takes_passes(conn: psycopg.Connection, params: dict[str, Any]) -> None:
    assert option_problem(str(params.get("model", "gpt-image-1")), params) is None
    submit_sql(conn, "free", {"prompt": "a fox", **params})
    assert counts(conn) == (1, 2)


def test_the_model_table_and_the_options_come_from_the_contract(
    conn: psycopg.Connection,
) -> None:
    rows = conn.execute(
        "SELECT name, max_prompt_chars, sizes, n_max, options, response_formats"
        " FROM genworker.image_models ORDER BY name"
    ).fetchall()
    keys = ("name", "max_prompt_chars", "sizes", "n_max", "options", "response_formats")
    assert [dict(zip(keys, r, strict=True)) for r in rows] == [
        MODELS[name].as_row() for name in sorted(MODELS)
    ]
    row = conn.execute("SELECT value FROM genworker.settings WHERE key = 'task_options'")
    assert row.fetchone() == (list(TASK_OPTIONS),)


def test_the_model_defaults_to_the_model_setting(conn: psycopg.Connection) -> None:
    params = {"prompt": "a fox", "size": "512x512"}  # dall-e-2 takes it, gpt-image-1 does not
    assert refused(conn, "SELECT genworker.submit_task('free', %s)", Jsonb(params)).sqlstate == (
        "GW003"
    )
    schema.sync_settings(conn, Settings(model="dall-e-2"))
    submit_sql(conn, "free", params)
    assert counts(conn) == (1, 2)


def test_the_model_a_task_was_checked_against_is_written_into_it(
    conn: psycopg.Connection,
) -> None:
    """A node sends the task's own model, whatever its --model: the one submit checked."""
    schema.sync_settings(conn, Settings(model="dall-e-2"))
    params = {"prompt": "a fox", "size": "512x512"}
    first = submit_sql(conn, "free", params, "acme", "image", "order-7")[0]
    row = conn.execute("SELECT params FROM genworker.tasks WHERE id = %s", (first,)).fetchone()
    assert row == ({**params, "model": "dall-e-2"},)
    # the same request again, with the key, is the same task (with the model or without)
    assert submit_sql(conn, "free", params, "acme", "image", "order-7")[0] == first
    pinned = {**params, "model": "dall-e-2"}
    assert submit_sql(conn, "free", pinned, "acme", "image", "order-7")[0] == first
    # a node migrated with another --model since: the task keeps the model it was checked for
    schema.sync_settings(conn, Settings(model="gpt-image-1"))
    row = conn.execute("SELECT params ->> 'model' FROM genworker.tasks WHERE id = %s", (first,))
    assert row.fetchone() == ("dall-e-2",)


def test_the_prompt_limit_is_the_smaller_of_the_setting_and_the_model(
    conn: psycopg.Connection,
) -> None:
    error = refused(
        conn,
        "SELECT genworker.submit_task('free', %s)",
        Jsonb({"prompt": "x" * 1001, "model": "dall-e-2"}),
    )
    assert error.sqlstate == "GW002"
    assert "the limit is 1000 for dall-e-2" in (error.diag.message_primary or "")
    submit_sql(conn, "free", {"prompt": "x" * 4000, "model": "gpt-image-1"})  # setting: 4000


# ------------------------------------------------------------------ the plan's models


def test_a_plan_may_list_its_models(conn: psycopg.Connection, client: Client) -> None:
    plans = parse_plans("free=2:0::dall-e-2,pro=70:2")
    schema.sync_settings(conn, Settings(plans=plans))
    error = refused(
        conn,
        "SELECT genworker.submit_task('free', %s)",
        Jsonb({"prompt": "p", "model": "dall-e-3"}),
    )
    assert error.sqlstate == "GW009"
    assert error.diag.message_primary == (
        'model "dall-e-3" is not allowed on plan free: it allows dall-e-2'
    )
    with pytest.raises(errors.ModelNotAllowed):
        client.submit("free", "p")  # the default model, gpt-image-1
    assert counts(conn) == (0, 0)
    client.submit("free", "p", params={"model": "dall-e-2"})
    client.submit("pro", "p", params={"model": "dall-e-3"}, n=1)  # no list: any model
    client.submit("free", "p", kind="noop")  # only image tasks have a model
    assert counts(conn) == (3, 5)


# ------------------------------------------------------------------ sizes and caps


def test_params_over_the_byte_limit_are_refused(conn: psycopg.Connection) -> None:
    big = {"prompt": "a fox", "note": "x" * 16_400}
    error = refused(conn, "SELECT genworker.submit_task('free', %s, 't', 'noop')", Jsonb(big))
    assert error.sqlstate == "GW006"
    assert "the limit is 16384" in (error.diag.message_primary or "")
    schema.sync_settings(conn, Settings(max_params_bytes=32_768))
    submit_sql(conn, "free", big, "t", "noop")
    assert counts(conn) == (1, 2)


def test_a_bulk_call_over_the_cap_writes_nothing(conn: psycopg.Connection) -> None:
    conn.execute("UPDATE genworker.settings SET value = '3' WHERE key = 'max_bulk_tasks'")
    task = {"plan": "free", "params": {"prompt": "a cat"}}
    error = refused(conn, "SELECT genworker.submit_tasks(%s)", Jsonb([task] * 4))
    assert error.sqlstate == "GW006"
    assert "4 tasks in one call, the limit is 3" in (error.diag.message_primary or "")
    conn.execute("SELECT genworker.submit_tasks(%s)", (Jsonb([task] * 3),))
    assert counts(conn) == (3, 6)


def test_the_default_bulk_cap_is_a_thousand(conn: psycopg.Connection) -> None:
    task = {"plan": "free", "params": {"prompt": "a cat"}, "kind": "noop"}
    assert refused(conn, "SELECT genworker.submit_tasks(%s)", Jsonb([task] * 1001)).sqlstate == (
        "GW006"
    )


def test_a_tenant_past_its_unfinished_tasks_is_refused_until_one_finishes(
    conn: psycopg.Connection, client: Client
) -> None:
    schema.sync_settings(conn, Settings(max_queued_tasks_per_tenant=2))
    first = client.submit("free", "a", tenant="acme", idempotency_key="k1")
    client.submit("free", "b", tenant="acme")
    with pytest.raises(errors.TooManyQueued) as caught:
        client.submit("free", "c", tenant="acme")
    assert "tenant acme already has 2 queued or running" in str(caught.value)
    assert counts(conn) == (2, 4)
    # a repeat of a submit that went through is not a new task: it still answers
    assert client.submit("free", "a", tenant="acme", idempotency_key="k1") == first
    client.submit("free", "c", tenant="umbrella")  # another tenant has its own count
    client.cancel(first)
    client.submit("free", "c", tenant="acme")
    assert counts(conn) == (4, 8)


def test_zero_means_no_cap_on_unfinished_tasks(conn: psycopg.Connection, client: Client) -> None:
    schema.sync_settings(conn, Settings(max_queued_tasks_per_tenant=0))
    conn.execute(
        "SELECT genworker.submit_tasks(%s)",
        (Jsonb([{"plan": "free", "params": {"prompt": "x"}}] * 5),),
    )
    assert counts(conn) == (5, 10)


# ------------------------------------------------------------------ idempotency


@pytest.mark.parametrize(
    ("what", "again"),
    [
        ("plan", {"plan": "start"}),
        ("kind", {"kind": "noop"}),
        ("n", {"n": 1}),
        ("params", {"prompt": "a red bicycle at night"}),
        ("params", {"params": {"quality": "high"}}),
    ],
)
def test_a_key_reused_for_another_request_is_a_conflict(
    conn: psycopg.Connection, client: Client, what: str, again: dict[str, Any]
) -> None:
    first: dict[str, Any] = {"plan": "free", "prompt": "a red bicycle", "tenant": "acme"}
    task = client.submit(**first, idempotency_key="order-7")
    with pytest.raises(errors.IdempotencyConflict) as caught:
        client.submit(**{**first, **again}, idempotency_key="order-7")
    assert str(caught.value) == (
        f'idempotency key "order-7" was first used for task {task} with another {what}: '
        "send the same request again, or use a new key"
    )
    assert caught.value.code == "GW013"
    assert caught.value.exit_code == 2
    assert counts(conn) == (1, 2)


def test_the_same_request_in_another_key_order_is_the_same_request(
    conn: psycopg.Connection,
) -> None:
    one = '{"prompt": "a cat", "quality": "low"}'
    other = '{"quality":"low",  "prompt":"a cat"}'
    call = "SELECT genworker.submit_task('free', %s::jsonb, 't', 'image', 'k', 2)"
    first = conn.execute(call, (one,)).fetchone()
    assert conn.execute(call, (other,)).fetchone() == first
    assert counts(conn) == (1, 2)

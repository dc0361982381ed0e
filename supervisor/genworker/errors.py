"""Typed errors. Each carries a one-line message fit to show a user as it is."""

from __future__ import annotations

from genworker.exits import EXIT_FAILED, EXIT_USAGE


class GenworkerError(Exception):
    """Base of every error genworker raises on purpose."""

    exit_code = EXIT_FAILED


class UsageError(GenworkerError):
    """Bad input from the caller: a flag, a setting, a submit. Nothing was changed."""

    exit_code = EXIT_USAGE


class ValidationError(UsageError):
    """A submit was rejected; `code` names the rule (the SQLSTATE the SQL side raised)."""

    code = "GW000"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class InvalidPlan(ValidationError):
    code = "GW001"


class InvalidPrompt(ValidationError):
    code = "GW002"


class InvalidSize(ValidationError):
    code = "GW003"


class InvalidTenant(ValidationError):
    code = "GW004"


class InvalidCount(ValidationError):
    code = "GW005"


class InvalidParams(ValidationError):
    code = "GW006"


class InvalidKind(ValidationError):
    code = "GW007"


class InvalidOption(ValidationError):
    """An option the task's model does not take, or a value it does not allow (the same
    rule as `contract.option_problem`), or any option on a model genworker does not know."""

    code = "GW008"


class ModelNotAllowed(ValidationError):
    """The task's plan lists the models it may use, and this is not one of them."""

    code = "GW009"


class TooManyQueued(ValidationError):
    """The tenant already has --max-queued-tasks-per-tenant tasks queued or running."""

    code = "GW012"


class IdempotencyConflict(ValidationError):
    """An idempotency key reused with another plan, kind, n or params (the same request
    again returns the first task)."""

    code = "GW013"


class TaskNotFound(UsageError):
    """The caller named a task that does not exist (or was pruned): exit 2, like bad input."""

    code = "GW010"


class NotRetryable(UsageError):
    code = "GW011"


BY_SQLSTATE: dict[str, type[GenworkerError]] = {
    cls.code: cls
    for cls in (
        InvalidPlan,
        InvalidPrompt,
        InvalidSize,
        InvalidTenant,
        InvalidCount,
        InvalidParams,
        InvalidKind,
        InvalidOption,
        ModelNotAllowed,
        TaskNotFound,
        NotRetryable,
        TooManyQueued,
        IdempotencyConflict,
    )
}


class DatabaseError(GenworkerError):
    """The database cannot be reached or used; the message says why and what to check."""


class SchemaMissing(DatabaseError):
    """The database has no (or an older) genworker schema."""

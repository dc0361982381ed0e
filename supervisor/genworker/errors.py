"""Typed errors. Each carries a one-line message fit to show a user as it is."""

from __future__ import annotations


class GenworkerError(Exception):
    """Base of every error genworker raises on purpose."""

    exit_code = 1


class UsageError(GenworkerError):
    """Bad input from the caller: a flag, a setting, a submit. Nothing was changed."""

    exit_code = 2


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
        TaskNotFound,
        NotRetryable,
    )
}


class DatabaseError(GenworkerError):
    """The database cannot be reached or used; the message says why and what to check."""


class SchemaMissing(DatabaseError):
    """The database has no (or an older) genworker schema."""

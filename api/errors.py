"""Error answers as OpenAPI declares them: every error is JSON `{"detail": ...}`.

Routes list the codes they can answer with, so /openapi.json is a complete description of
the API for app developers and for schema-driven fuzzing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorOut(BaseModel):
    detail: str


class ValidationIssue(BaseModel):
    model_config = ConfigDict(extra="allow")  # pydantic adds input, ctx, url

    loc: list[str | int]
    msg: str
    type: str


class InvalidOut(BaseModel):
    """Either a message (the store or the ledger refused a value) or pydantic's problems."""

    detail: str | list[ValidationIssue]


_DESCRIPTIONS = {
    401: "not signed in, or the token is invalid or expired",
    403: "not allowed for this role, or refused by the access rules",
    404: "not found; the detail names what",
    409: "conflicts with what is stored; the detail says how",
    422: "invalid input: `detail` is a message, or pydantic's list of problems",
    429: "too many attempts; the Retry-After header says after how many seconds to retry",
    502: "the device answered with an error",
    503: "a service this route needs is not running, not reachable or busy (then with "
         "Retry-After)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route for the error codes it can answer with."""
    return {
        code: {
            "model": InvalidOut if code == 422 else ErrorOut,
            "description": _DESCRIPTIONS[code],
        }
        for code in codes
    }

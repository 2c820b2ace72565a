"""The coordinator's one exception family; each maps to an HTTP status and a one-line message."""

from __future__ import annotations


class CoordinatorError(Exception):
    """An expected failure with a message fit for a user (HTTP status in `status`)."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(CoordinatorError):
    status = 400


class Unauthorized(CoordinatorError):
    status = 401


class Forbidden(CoordinatorError):
    status = 403


class NotFound(CoordinatorError):
    status = 404


class Conflict(CoordinatorError):
    status = 409


class Gone(CoordinatorError):
    status = 410

"""One domain error hierarchy; every transport maps it in exactly one place."""

from typing import Any


class ApplicationError(Exception):
    """A domain error with a stable machine code, a human message and optional details."""

    code = "error"
    default_message = "The request could not be completed."

    def __init__(
        self, message: str | None = None, *, code: str | None = None, details: Any = None
    ) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        self.details = details if details is not None else {}
        super().__init__(self.message)


class ValidationFailed(ApplicationError):
    code = "invalid"
    default_message = "The input is invalid."


class NotFound(ApplicationError):
    code = "not_found"
    default_message = "Not found."


class Conflict(ApplicationError):
    code = "conflict"
    default_message = "The request conflicts with the current state."


class PreconditionFailed(ApplicationError):
    code = "precondition_failed"
    default_message = "The current state does not allow this operation."


class Unprocessable(ApplicationError):
    code = "unprocessable"
    default_message = "The request is well-formed but cannot be processed."


class NotAuthenticated(ApplicationError):
    code = "not_authenticated"
    default_message = "Authentication is required."


class PermissionDenied(ApplicationError):
    code = "permission_denied"
    default_message = "You do not have permission to do this."


class RateLimited(ApplicationError):
    code = "rate_limited"
    default_message = "Too many requests."


class UpstreamTimeout(ApplicationError):
    code = "timeout"
    default_message = "A downstream peer did not answer in time."


class Unavailable(ApplicationError):
    code = "unavailable"
    default_message = "A required service is unavailable."

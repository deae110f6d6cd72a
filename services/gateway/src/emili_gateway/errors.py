"""The gateway's refinements of the domain errors, for HTTP statuses or error codes gRPC has no code for.

Each subclasses the emili_core error it refines, so code that catches the general error still catches it.
"""

from __future__ import annotations

from emili_core.errors import FailedPrecondition, InvalidInput, NotFound, Overloaded


class CanaryNotFound(NotFound):
    """The study exists but has had no canary: HTTP 404 with its own code, so a client (the loop) tells it from an
    unknown study without reading the message."""


class NoStudyForCanary(FailedPrecondition):
    """No study can take the canary now (none is served by the production version, or each runs another canary):
    HTTP 409 with its own code, so a client (the loop) waits and asks again rather than giving the candidate up."""


class Gone(FailedPrecondition):
    """The thing existed but can no longer be used (an expired invite): HTTP 410."""


class PayloadTooLarge(InvalidInput):
    """A body, frame or message over its size limit: HTTP 413."""


class RateLimited(Overloaded):
    """Too many requests from one caller: HTTP 429 with Retry-After."""

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

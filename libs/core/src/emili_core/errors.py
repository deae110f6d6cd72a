"""Domain errors. Services raise these; one interceptor maps them to gRPC status codes."""

from __future__ import annotations


class EmiliError(Exception):
    """Base of errors whose message is safe and useful to show to the caller."""


class InvalidInput(EmiliError):
    pass


class NotFound(EmiliError):
    pass


class FailedPrecondition(EmiliError):
    pass


class Overloaded(EmiliError):
    pass


class DependencyUnavailable(EmiliError):
    pass


class Unauthenticated(EmiliError):
    pass


class PermissionDenied(EmiliError):
    pass


class NotReady(DependencyUnavailable):
    """The service is still loading or warming up its model."""

"""Exceptions of the routing domain."""


class DomainError(Exception):
    """Base class for errors of the routing domain."""


class UnknownEventType(DomainError):
    """A stored event names a type this build does not know (written by a newer version?)."""


class MalformedEvent(DomainError):
    """A stored event's fields do not match its type."""


class InvalidTransition(DomainError):
    """An event that does not fit the current state (adding a node twice, removing a ghost).

    The state is unchanged. Decisions never produce such events; a log that contains one
    was not written by the dispatcher.
    """

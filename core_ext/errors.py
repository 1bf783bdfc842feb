"""Exceptions raised by both selector implementations.

Each one is also a built-in exception type (ValueError, TypeError, KeyError), so callers
that catch the usual Python types keep working, while callers that care can catch
`SelectorError` for everything the core refuses.
"""


class SelectorError(Exception):
    """Base class: the selector refused an operation and its state is unchanged."""


class InvalidArgument(SelectorError, ValueError):
    """A value out of its allowed range (negative weight, capacity 0, watermarks out of order)."""


class InvalidArgumentType(InvalidArgument, TypeError):
    """A value of the wrong type (a float weight, a str where a bool is needed).

    It is a ValueError (the contract says so for weights) and a TypeError (Python's usual
    type for this), so either `except` clause catches it.
    """


class DuplicateNode(SelectorError, ValueError):
    """`add()` of a node id that is already present."""


class UnknownNode(SelectorError, KeyError):
    """An operation on a node id that is not present."""

    def __str__(self) -> str:
        # KeyError quotes its argument; the message is already a sentence.
        return str(self.args[0]) if self.args else ""

"""Exceptions of the event log. Each names the place: segment, byte offset, sequence."""


class EventLogError(Exception):
    """Base class for event log errors."""


class LogCorrupted(EventLogError):
    """A record that is not the torn tail of a crash: bad checksum, broken hash chain,
    wrong sequence, or valid records after a bad one. The log refuses to open for writing
    unless told to salvage (keep the records before the damage, drop the rest)."""

    def __init__(self, message: str, *, segment: str, offset: int, seq: int) -> None:
        super().__init__(message)
        self.segment, self.offset, self.seq = segment, offset, seq


class UnsupportedFormat(EventLogError):
    """A segment written in a format version this build does not read (a newer one)."""


class LogLocked(EventLogError):
    """Another process has the log open for writing."""


class LogClosed(EventLogError):
    """An append to a log that was closed or failed; the state may be ahead of the log."""


class StreamConfigError(EventLogError):
    """The JetStream stream cannot be this log: its config could lose events or belongs to
    something else, it cannot be created as asked (e.g. more replicas than servers), or
    (for a reader that did not open the log) it does not exist."""


class AppendFailed(EventLogError):
    """JetStream refused an append, or did not acknowledge it within `retry_for` seconds."""


class LogUnavailable(EventLogError):
    """The log's storage does not answer (JetStream stalled or unreachable): try later."""


class StaleWriter(EventLogError):
    """Someone else appended to a shared log since this writer last read it (JetStream)."""

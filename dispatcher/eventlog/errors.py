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
    """Another process has the log open for writing. `pid` and `run_id` are what it
    recorded in the lock file (`run_id`: the `imdispatch serve` it belongs to, if any)."""

    def __init__(self, message: str, *, pid: str = "unknown", run_id: str | None = None) -> None:
        super().__init__(message)
        self.pid, self.run_id = pid, run_id


class LogMissing(EventLogError):
    """The log a writer expected to find is not there (its directory, lock file or
    segments vanished): a new, empty log must not silently take its place."""


class LogReplaced(EventLogError):
    """The files an open log writes to are no longer the ones at its path (the directory
    or a file was removed, moved or replaced): what it writes would be lost."""


class RecordTooLarge(EventLogError, ValueError):
    """An event whose encoding is larger than the log stores in one record."""


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

"""Files in the event log's directory, opened so that what is there cannot trick the
service: never through a symbolic link, never blocking on a FIFO, never clobbering a file
that a temporary name already points at. And the rule for who may change that directory.

The service often runs as root, so a link planted in its log directory could make it
overwrite or truncate any file, a FIFO could hang its start, and a directory that other
users can write lets them do both and swap its files (LOCK, admin.sock) for their own.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from dispatcher.eventlog.errors import EventLogError

SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO never blocks
KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFLNK: "a symbolic link",
         stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


class NotRegularFile(EventLogError):
    """A file of the log (LOCK, CLEAN, a segment, a snapshot) that is not a regular file:
    refused, never opened as one (a FIFO would block, a link could point anywhere)."""


def _not_regular(path: str | os.PathLike, mode: int) -> NotRegularFile:
    kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return NotRegularFile(f"{path} is {kind}, not a regular file: the event log keeps only "
                          "regular files there (move it away)")


def open_regular(path: str | os.PathLike, flags: int, mode: int = 0o644, *,
                 dir_fd: int | None = None, shown: str | os.PathLike | None = None) -> int:
    """`os.open` that refuses anything but a regular file (`NotRegularFile`, naming
    `shown` or `path`); a directory fails as the kernel says (`IsADirectoryError`)."""
    shown = shown if shown is not None else path
    try:
        fd = os.open(path, flags | SAFE_OPEN, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link; a FIFO or socket for writing
            raise _not_regular(shown, os.lstat(path, dir_fd=dir_fd).st_mode) from None
        raise
    try:
        mode_now = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode_now):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(shown))
        if not stat.S_ISREG(mode_now):
            raise _not_regular(shown, mode_now)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike) -> bytes:
    """The whole content of the regular file at `path` (see `open_regular`)."""
    fd = open_regular(path, os.O_RDONLY)
    with open(fd, "rb", closefd=True) as handle:
        return handle.read()


def require_regular(path: str | os.PathLike) -> None:
    """Raise `NotRegularFile` unless `path` is a regular file (not followed if a link)."""
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def replace_atomically(path: str | os.PathLike, data: bytes, *, fsync: bool) -> None:
    """Write `data` to `<path>.tmp`, created afresh (O_EXCL: never a file or link already
    there; one left by a crash is removed first), optionally fsynced, then renamed over
    `path`: readers see the old content or the new, and a planted link is never followed."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(temporary, flags, 0o644)
    except FileExistsError:  # left by a crash (or planted): removing a link removes the link
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, flags, 0o644)
    try:
        with open(fd, "wb", closefd=False) as handle:
            handle.write(data)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, path)


# -- who may change the log directory -------------------------------------------------

def unsafe_directory(path: str | os.PathLike, subdirectories: tuple[str, ...] = ()) -> str | None:
    """Why other users could change the log directory at `path`, or None (as OpenSSH's
    StrictModes): it, its `subdirectories` and the files in them must be the service's
    own (its uid) and writable by no one else; every directory above it must belong to
    root or the service and be writable by no one else, unless it is sticky (as /tmp:
    others cannot rename or remove what is not theirs there). The real path is checked."""
    uid = os.geteuid()
    real = Path(os.path.realpath(path))
    for above in reversed(real.parents):
        info = os.stat(above)
        if info.st_uid not in (0, uid):
            return (f"{above} (above {real}) belongs to {_user(info.st_uid)}: other users "
                    "must not be able to move the log; use a directory whose parents belong "
                    f"to root{'' if uid == 0 else ' or ' + _name(uid)}")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            return _loose(above, info.st_mode, f" (above {real})")
    for directory in (real, *(real / name for name in subdirectories)):
        try:
            entries = [directory, *(Path(e.path) for e in os.scandir(directory))]
        except (FileNotFoundError, NotADirectoryError):
            continue  # a subdirectory not made yet (or not one: the log says so)
        for entry in entries:
            try:
                info = os.lstat(entry)
            except FileNotFoundError:  # gone meanwhile (a running dispatcher's temp file)
                continue
            if info.st_uid != uid:
                return (f"{entry} belongs to {_user(info.st_uid)}, not to {_user(uid)} that "
                        f"the dispatcher runs as: chown -R {_name(uid)} {real}")
            if (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)) and (
                    info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
                return _loose(entry, info.st_mode)
    return None


def _loose(path: Path, mode: int, where: str = "") -> str:
    return (f"{path}{where} is writable by other users (mode {stat.S_IMODE(mode):04o}): "
            f"chmod go-w {path}")


def _name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user(uid: int) -> str:
    name = _name(uid)
    return f"uid {uid}" if name == str(uid) else f"{name} (uid {uid})"

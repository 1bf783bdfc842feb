"""How workers reach the leader (the worker that writes the event log): a Unix socket in
the log directory for admin commands, and a status file the leader rewrites after every
poll cycle so that followers know how fresh the state is.

The socket is the service's own: mode 0600 whatever the umask, and the leader serves only
peers running as its own uid (SO_PEERCRED). It trusts the actor a command names (the
follower that sent it checked the bearer token); a process of that uid could name any
actor, but it could as well read the tokens from the workers' environment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from dispatcher import admin
from dispatcher import config as cfg
from dispatcher.eventlog.files import NotRegularFile, read_regular, replace_atomically

REPLACEMENT = "IMDISPATCH_REPLACEMENT_WORKER"
"""Set by `imdispatch serve` in the workers it starts in place of dead ones."""
SOCKET = "admin.sock"
STATUS = "STATUS"
MAX_COMMAND = 1 << 20
PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
log = logging.getLogger("imdispatch")


def admin_socket(config: cfg.Config) -> Path:
    return Path(config.eventlog.path) / SOCKET


class LeaderStatus(NamedTuple):
    """What the leader wrote after its last poll cycle."""

    last_cycle: float  # when it ended (wall clock)
    nats_connected: bool
    seq: int  # the leader's state then: a follower has that cycle once it is this far


def write_status(leader: Any) -> None:
    """After a poll cycle: when it ended, whether NATS is connected, and the seq the
    leader's state had reached (the cycle's own events included)."""
    replace_atomically(Path(leader.config.eventlog.path) / STATUS, orjson.dumps({
        "last_cycle": time.time(),
        "nats_connected": bool(leader.nc is not None and leader.nc.is_connected),
        "seq": leader.state.seq,
        "pid": os.getpid(),
    }), fsync=False)  # never through a link planted at STATUS.tmp


def read_status(config: cfg.Config) -> LeaderStatus | None:
    """The leader's status after its last poll cycle, if it wrote a readable one."""
    try:
        status = orjson.loads(read_regular(Path(config.eventlog.path) / STATUS))
        return LeaderStatus(float(status["last_cycle"]), bool(status["nats_connected"]),
                            int(status["seq"]))
    except (OSError, ValueError, KeyError, TypeError, NotRegularFile):
        return None


async def serve_admin(leader: Any) -> asyncio.AbstractServer:
    """Run admin commands sent by the other workers: one JSON line in, one out."""
    path = admin_socket(leader.config)
    path.unlink(missing_ok=True)  # left by a leader that died

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refusal = _refusal(writer)
        if refusal is not None:
            log.warning("admin socket %s: %s", path, refusal)
            writer.write(orjson.dumps({"status": 403, "body": {"error": refusal}}) + b"\n")
            writer.close()
            return
        try:
            command = orjson.loads(await reader.readline())
            status, body = await admin.execute(leader, command["op"], command["args"],
                                               command["actor"])
        except (ValueError, KeyError, TypeError) as exc:
            status, body = 400, {"error": f"bad admin command: {exc}"}
        writer.write(orjson.dumps({"status": status, "body": body}) + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, sock=_bind_private(path), limit=MAX_COMMAND)


def _bind_private(path: Path) -> socket.socket:
    """A Unix socket bound at `path` that only its owner can connect to, whatever the
    umask: bound in a fresh 0700 directory, made 0600 there (out of anyone else's reach)
    and only then moved into place, so it is never reachable with a wider mode."""
    private = Path(tempfile.mkdtemp(prefix=".a-", dir=path.parent))
    staged = private / "s"  # short names: a socket's path has at most 107 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(staged))
        os.chmod(staged, 0o600)
        os.replace(staged, path)
    except BaseException:
        sock.close()
        raise
    finally:
        staged.unlink(missing_ok=True)
        private.rmdir()
    return sock


def _refusal(writer: asyncio.StreamWriter) -> str | None:
    """Why this peer may not send admin commands (it runs as another user), or None."""
    sock = writer.get_extra_info("socket")
    pid, uid, _ = PEER_CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size))
    if uid == os.geteuid():
        return None
    return (f"refused pid {pid} running as uid {uid}: only this service's uid "
            f"{os.geteuid()} may send admin commands")


async def forward_admin(config: cfg.Config, op: str, args: dict[str, Any],
                        actor: str) -> tuple[int, Any]:
    """Send an admin command to the leader; 503 if it cannot be reached."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(admin_socket(config)), limit=MAX_COMMAND), 5)
        writer.write(orjson.dumps({"op": op, "args": args, "actor": actor}) + b"\n")
        reply = orjson.loads(await asyncio.wait_for(reader.readline(), 30))
        writer.close()
        return reply["status"], reply["body"]
    except TypeError as exc:  # not JSON-encodable (an integer beyond 64 bits, say)
        return 400, {"error": f"bad admin arguments: {exc}"}
    except (OSError, TimeoutError, ValueError, KeyError) as exc:
        return 503, {"error": f"the worker that writes the event log is unavailable: {exc}"}

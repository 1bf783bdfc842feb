"""`imdispatch`: the dispatcher's command line (also `python -m dispatcher`).

Exit codes: 0 success, 1 the check failed (self-check mismatch, a corrupted log or one
whose events do not fold), 2 usage error or a log that cannot be read at all (missing,
locked by a writer, written in a newer format).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import orjson

from dispatcher.domain.events import EVENT_TYPES
from imnode import logs

ENVELOPE = ("type", "seq", "time", "actor", "reason", "node")
AUDIT_WIDTH = 120  # `audit`'s table fits a 120-column terminal; --json has every byte
log = logging.getLogger("imdispatch.supervisor")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imdispatch", description="Dispatcher for IM long-connection servers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('imdispatch')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the dispatcher")
    serve.add_argument("--config", required=True, metavar="PATH", help="dispatcher.toml")
    serve.add_argument("--log-level", default="info", choices=logs.LEVELS)
    serve.add_argument("--log-format", default="auto", choices=logs.FORMATS,
                       help="json: one object per line; text: for people; auto (default): "
                            "text on a terminal, else json")
    from dispatcher.demo.options import add_arguments

    add_arguments(commands.add_parser(
        "demo", help="run a whole cluster here with clients and a live view (Ctrl-C stops)"))
    commands.add_parser(
        "selfcheck",
        help="check that the compiled selection core is installed and agrees with the reference",
    )
    replay = commands.add_parser(
        "replay", help="rebuild the routing state from an event log and show its nodes"
    )
    _history_arguments(replay)
    replay.add_argument("--until", type=_seq, metavar="SEQ", help="stop after this event")
    replay.add_argument("--json", action="store_true", help="node objects as JSON")
    audit = commands.add_parser("audit", help="list the events of a log, filtered")
    _history_arguments(audit)
    audit.add_argument("--node", metavar="ID", help="only events about this node")
    audit.add_argument("--type", choices=sorted(EVENT_TYPES), metavar="TYPE",
                       help=f"only events of this type: {', '.join(sorted(EVENT_TYPES))}")
    audit.add_argument("--json", action="store_true", help="events as a JSON array")
    verify = commands.add_parser(
        "verify", help="check every record's checksum and the hash chain of a log"
    )
    _history_arguments(verify)
    recover = commands.add_parser(
        "recover", help="recover a log's tail after a crash, as the dispatcher does at start"
    )
    recover.add_argument("--log", required=True, metavar="PATH", help="event log directory")
    recover.add_argument(
        "--salvage", action="store_true",
        help="also cut off corruption in the last segment, keeping the records before it",
    )
    return parser


NATS_PASSWORD = "IMDISPATCH_NATS_PASSWORD"  # secrets from the environment: `ps` shows argv
NATS_TOKEN = "IMDISPATCH_NATS_TOKEN"
NATS_FILES = {"creds": "nats_creds", "nkey_seed": "nats_nkey", "tls_ca": "nats_tls_ca",
              "tls_cert": "nats_tls_cert", "tls_key": "nats_tls_key"}  # [nats] key: argument
STREAM_ARGUMENTS = ("nats", "stream", "nats_user", *NATS_FILES.values())


def _history_arguments(command: argparse.ArgumentParser) -> None:
    """Where `replay`, `audit` and `verify` read: a file log, or a JetStream stream with
    the `[nats]` table's credential options (the password and token from the environment,
    as `imnode serve` takes its own)."""
    command.add_argument("--log", metavar="PATH", help="event log directory")
    stream = command.add_argument_group(
        "JetStream history (instead of --log)",
        f"The password of --nats-user comes from ${NATS_PASSWORD}; a token from "
        f"${NATS_TOKEN}.")
    stream.add_argument("--nats", metavar="URL", help="NATS server URL(s), comma-separated")
    stream.add_argument("--stream", metavar="NAME", help="the event log's JetStream stream")
    stream.add_argument("--nats-user", metavar="USER", help="NATS user")
    stream.add_argument("--nats-creds", metavar="FILE", help="NATS .creds file (JWT + nkey)")
    stream.add_argument("--nats-nkey", metavar="FILE", help="file with a NATS nkey seed")
    stream.add_argument("--nats-tls-ca", metavar="FILE", help="CA bundle for NATS over TLS")
    stream.add_argument("--nats-tls-cert", metavar="FILE", help="client certificate for TLS")
    stream.add_argument("--nats-tls-key", metavar="FILE", help="its private key")


def _history(args: argparse.Namespace) -> Any:
    """The history the arguments name (a log directory or a `logtools.StreamSource`), or
    None once a one-line usage error is printed."""
    from pathlib import Path

    from dispatcher.config import NatsConfig
    from dispatcher.logtools import StreamSource

    def flag(name: str) -> str:
        return f"--{name.replace('_', '-')}"

    servers = tuple(url.strip() for url in (args.nats or "").split(",") if url.strip())
    given = [flag(name) for name in STREAM_ARGUMENTS if getattr(args, name) is not None]
    missing = [name for name in NATS_FILES.values()
               if getattr(args, name) is not None and not Path(getattr(args, name)).is_file()]
    problem = None
    if args.log is not None and given:
        problem = f"--log reads a file log, {' '.join(given)} a stream: give one of them"
    elif args.log is None and (not servers or args.stream is None):
        problem = "give --log PATH (a file log) or --nats URL --stream NAME (a JetStream stream)"
    elif missing:
        problem = f"{flag(missing[0])}: no such file: {getattr(args, missing[0])}"
    if problem is not None:
        print(f"imdispatch {args.command}: {problem}", file=sys.stderr)
        return None
    if args.log is not None:
        return args.log
    from dispatcher.cluster.snapshots import kept

    return StreamSource(NatsConfig(
        servers=servers, user=args.nats_user,
        password=(os.environ.get(NATS_PASSWORD) or None) if args.nats_user else None,
        token=os.environ.get(NATS_TOKEN) or None,
        **{key: getattr(args, name) for key, name in NATS_FILES.items()}), args.stream,
        snapshots=kept)


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a sequence number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"sequence numbers start at 0, got {value}")
    return value


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, width: int = 0,
           elidable: Collection[str] = ()) -> str:
    """Columns two spaces apart. Past `width` characters (0: no limit), the widest of the
    `elidable` columns is narrowed, and its longer cells end in "...", until lines fit:
    one long cell (a whole configuration) must not pad every line of the table."""
    cells = [list(headers)]
    cells += [["-" if value is None else _printable(str(value)) for value in row]
              for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if width:
        widths = _narrowed(widths, [header in elidable for header in headers], width)
    return "\n".join(
        "  ".join(_elide(cell, w).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


_ELIDED_MIN = 8  # an elided column keeps at least this many characters


def _narrowed(widths: list[int], elidable: list[bool], width: int) -> list[int]:
    """The widths, the elidable ones capped at the highest level that fits `width` (found
    by bisection: a cell can be megabytes), none below `_ELIDED_MIN`."""

    def capped(level: int) -> list[int]:
        return [min(w, max(level, _ELIDED_MIN)) if cut else w
                for w, cut in zip(widths, elidable, strict=True)]

    def fits(level: int) -> bool:
        return sum(capped(level)) + 2 * (len(widths) - 1) <= width

    low, high = 0, max(widths)  # fits(high) is "no cap": the table as it is
    if fits(high):
        return widths
    while low < high:  # the highest level that fits, or 0: as narrow as it gets
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return capped(low)


def _elide(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Control characters as escapes: a reason sent through the admin API may hold a
    newline or a terminal escape sequence, which must neither break rows nor drive the
    operator's terminal."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def _replay(args: argparse.Namespace) -> int:
    from dispatcher import logtools

    source = _history(args)
    if source is None:
        return 2
    state, torn = logtools.replay(source, args.until)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(state.node_views(), option=orjson.OPT_INDENT_2))
        sys.stdout.write("\n")
    else:
        when = _when(state.time) if state.seq else "-"
        print(f"state at seq {state.seq} ({when}), {len(state.nodes)} nodes, "
              f"watermarks {state.high_watermark}/{state.low_watermark}")
        print(_table(
            ("NODE", "ADDRESS", "WEIGHT", "EFFECTIVE", "HEALTH", "LOAD", "OVERLOADED",
             "DRAINING", "CHANGED AT"),
            (
                (
                    v["id"], f"{v['ip']}:{v['port']}", v["weight"], v["effective_weight"],
                    v["health"] + (f" ({v['health_cause']})" if v["health_cause"] else ""),
                    f"{v['connections']}/{v['capacity']}" if v["capacity"] else None,
                    "yes" if v["overloaded"] else "no", "yes" if v["draining"] else "no",
                    f"seq {v['updated_seq']}",
                )
                for v in state.node_views()
            ),
        ))
    _note_torn(torn)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from dispatcher import logtools

    source = _history(args)
    if source is None:
        return 2
    start = logtools.history_start(source).describe()  # a bounded history's start
    if start:
        print(start, file=sys.stderr if args.json else sys.stdout, flush=True)
    events = logtools.audit(source, node=args.node, kind=args.type)
    if args.json:
        out = sys.stdout.buffer
        out.write(b"[")
        for index, event in enumerate(events):
            out.write(b",\n" if index else b"\n")
            out.write(orjson.dumps(event))
        out.write(b"\n]\n")
        return 0
    rows = (
        (
            event.seq, _when(event.time), event.type, event.node_id, event.actor,
            " ".join(f"{k}={v}" for k, v in event.to_dict().items() if k not in ENVELOPE),
            event.reason,
        )
        for event in events
    )
    table = _table(("SEQ", "TIME", "TYPE", "NODE", "ACTOR", "DETAILS", "REASON"), rows,
                   width=AUDIT_WIDTH, elidable=("NODE", "ACTOR", "DETAILS", "REASON"))
    print(table, flush=True)  # before the note below on a shared terminal
    if "..." in table:  # cheap and only a hint: a cell may end in "..." by itself
        print(f"(long cells are cut to fit {AUDIT_WIDTH} columns; --json shows them whole)",
              file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dispatcher import logtools

    source = _history(args)
    if source is None:
        return 2
    result = logtools.verify(source)
    where = "" if result.segments is None else f" in {result.segments} segment(s)"
    print(f"{result.source}: {result.records} records{where}, seq {result.first_seq}.."
          f"{result.last_seq}, head hash {result.head_hash.hex()[:16]}")
    if result.start.describe():
        print(result.start.describe())
    for line in result.snapshots:
        print(f"snapshot {line}")
    _note_torn(result.torn)
    if result.bad_snapshots:
        print(f"FAILED: {result.bad_snapshots} snapshots do not match the log", file=sys.stderr)
        return 1
    checked = "checksum" if result.segments is not None else "record's format"
    print(f"ok: every {checked}, sequence number and hash link is valid")
    return 0


def _recover(args: argparse.Namespace) -> int:
    from dispatcher import logtools

    recovery = logtools.recover(args.log, salvage=args.salvage)
    for line in recovery.describe() or ["nothing to recover: the log ends with a whole record"]:
        print(line)
    print(f"the log ends at seq {recovery.last_seq}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from sanic import Sanic

    from dispatcher import config as cfg
    from dispatcher import fast_path, http_server
    from dispatcher.web import create_app

    logs.configure(args.log_level, args.log_format)
    # What this process and its workers create (the log, its snapshots, the admin
    # socket's directory, ...) is never writable by other users, whatever the umask.
    os.umask(os.umask(0) | 0o022)
    try:
        config = cfg.load(args.config)
    except cfg.ConfigError as exc:
        print(f"imdispatch serve: {exc}", file=sys.stderr)
        return 2
    if not config.eventlog.clustered:  # a cluster's history is in its stream
        problem = _log_directory_problem(config.eventlog.path)
        if problem:
            print(f"imdispatch serve: {args.config}: [eventlog] path: {problem}",
                  file=sys.stderr)
            return 2
        if not _own_the_log(args.config, config.eventlog.path):
            return 2
    http_server.raise_file_limit()  # the workers inherit it: their connection caps follow
    try:  # bound here, once: a taken port is one line, whatever the number of workers
        public = http_server.listen(config.http.host, config.http.port, config.http.backlog,
                                    "[http] port")
        admin = config.http.admin_address()
        if admin is not None:
            admin = http_server.listen(*admin, config.http.backlog, "[http] admin_listen")
    except http_server.ListenError as exc:
        print(f"imdispatch serve: {args.config}: {exc}", file=sys.stderr)
        return 2
    print(f"imdispatch serving http://{config.http.host}:{config.http.port} with "
          f"{config.http.workers} worker(s)", flush=True)
    app_options = {"log_level": args.log_level, "log_format": args.log_format,
                   "admin_socket": admin}  # to every worker (pickled as a socket)
    if config.http.workers == 1:
        app = create_app(config, args.config, **app_options)
        app.prepare(sock=public, protocol=fast_path.protocol_for(config.http),
                    backlog=config.http.backlog, access_log=False, motd=False,
                    single_process=True)
        Sanic.serve_single(primary=app)
        return 0
    # Several worker processes, each building its app; the first to lock the event log
    # leads (polls, writes), the others follow its log. One listening socket, shared.
    # Their figures for /metrics meet in a directory of this run's own.
    import shutil
    import tempfile

    from sanic.worker.loader import AppLoader

    from core_ext.ledger import Ledger
    from dispatcher.pacing import LEDGER_FILE
    from dispatcher.stats import DIRECTORY_VARIABLE

    stats_dir = tempfile.mkdtemp(prefix="imdispatch-stats-")
    os.environ[DIRECTORY_VARIABLE] = stats_dir  # the workers inherit it
    try:  # the counts every worker picks against (pacing.open_ledger), made once here
        Ledger.create(os.path.join(stats_dir, LEDGER_FILE))
    except OSError as exc:
        shutil.rmtree(stats_dir, ignore_errors=True)
        print(f"imdispatch serve: cannot make the workers' shared ledger in {stats_dir}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2

    import sanic.mixins.startup

    sanic.mixins.startup.Manager = _manager_ending_with_us  # see its docstring
    loader = AppLoader(factory=functools.partial(create_app, config, args.config,
                                                 **app_options))
    app = loader.load()
    signal.signal(signal.SIGHUP, lambda *_: _pass_reload(config, app))
    app.prepare(sock=public, protocol=fast_path.protocol_for(config.http),
                workers=config.http.workers, backlog=config.http.backlog, access_log=False,
                motd=False)
    replacer = _WorkerReplacer()
    app.register_listener(replacer.start, "main_process_ready")
    try:
        Sanic.serve(primary=app, app_loader=loader)
    finally:
        shutil.rmtree(stats_dir, ignore_errors=True)
    return 1 if replacer.gave_up else 0


def _manager_ending_with_us() -> Any:
    """Sanic's shared-state process (a `multiprocessing.Manager()` its supervisor starts),
    made to end with this supervisor: a SIGKILLed supervisor's workers stop by
    themselves, but the manager process was left running for ever (Sanic has no hook for
    it, so `serve` replaces the name Sanic calls)."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from dispatcher.demo.lifetime import end_with_parent

    manager = SyncManager(ctx=multiprocessing.get_context())
    manager.start(initializer=end_with_parent, initargs=(os.getpid(),))
    return manager


class _WorkerReplacer:
    """In the supervisor of several workers: start a new worker in place of each one that
    dies (killed, crashed), so the listening socket the supervisor holds is always served.
    Sanic's worker manager only notes a dead worker; with none left it would hold the
    socket and answer nothing, which no process manager can see. Past `BUDGET` deaths in
    `WINDOW` seconds (a crash loop) it gives up: the supervisor stops and exits 1."""

    CHECK_EVERY = 0.2
    BUDGET = 5
    WINDOW = 60.0

    def __init__(self) -> None:
        self.gave_up = False
        self._stopping = threading.Event()
        self._replaced: set[int] = set()  # pids of dead workers already replaced
        self._deaths: deque[float] = deque()

    def start(self, app: Any) -> None:
        """`main_process_ready`: the manager exists, its signal handlers are set."""
        for signum in (signal.SIGINT, signal.SIGTERM):  # a stop must not look like deaths
            signal.signal(signum, functools.partial(self._stop, signal.getsignal(signum)))
        threading.Thread(target=self._watch, args=(app.manager,), name="worker-replacer",
                         daemon=True).start()

    def _stop(self, handler: Any, signum: int, frame: Any) -> None:
        self._stopping.set()
        handler(signum, frame)

    def _watch(self, manager: Any) -> None:
        from sanic.worker.constants import ProcessState

        from dispatcher import leader_link

        settled = (ProcessState.NONE, ProcessState.IDLE, ProcessState.RESTARTING,
                   ProcessState.TERMINATED)  # not started yet, or stopped on purpose
        while not self._stopping.wait(self.CHECK_EVERY):
            for process in list(manager.transient_processes):
                pid = process.pid
                if (pid is None or pid in self._replaced or process.is_alive()
                        or process.state in settled):
                    continue
                self._replaced.add(pid)
                if self._over_budget():
                    log.error("%d workers died within %g s: stopping", self.BUDGET + 1,
                              self.WINDOW)
                    self.gave_up = True
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                log.error("worker %d died (exit code %s): starting another", pid,
                          process.exitcode)
                os.environ[leader_link.REPLACEMENT] = "1"  # inherited by the new worker
                manager.monitor_publisher.send(process.name)  # the manager restarts it

    def _over_budget(self) -> bool:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > self.WINDOW:
            self._deaths.popleft()
        return len(self._deaths) > self.BUDGET


def _own_the_log(config_path: str, log_path: str) -> bool:
    """Refuse (one line, naming the holder's pid) a log that another dispatcher writes;
    else give this run an id its workers inherit, so that they, and only they, follow the
    one of them that leads."""
    from os import environ
    from uuid import uuid4

    from dispatcher.eventlog.filelog import writer_pid
    from dispatcher.runtime import RUN_ID

    holder = writer_pid(log_path)
    if holder is not None:
        print(f"imdispatch serve: {config_path}: [eventlog] path: {log_path} is in use by "
              f"another dispatcher (pid {holder})", file=sys.stderr)
        return False
    environ[RUN_ID] = uuid4().hex
    return True


def _log_directory_problem(path: str) -> str | None:
    """Why the event log directory cannot be used (made if missing) or the log in it
    cannot be opened for writing, or None: one line, before any worker starts.

    Other users must not be able to change the directory (`files.unsafe_directory`): the
    service, often root, writes files there and trusts what it finds (LOCK's pid, the
    admin socket). Writability is checked by writing, not by permission bits: root passes
    those, a read-only mount does not; the probe is a new file (O_EXCL), never a link."""
    import tempfile
    from pathlib import Path

    from dispatcher.eventlog.errors import EventLogError, LogCorrupted, LogLocked
    from dispatcher.eventlog.filelog import FileLog
    from dispatcher.eventlog.files import unsafe_directory
    from dispatcher.eventlog.snapshots import SNAPSHOT_DIR

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        unsafe = unsafe_directory(path, (SNAPSHOT_DIR,))
        if unsafe:
            return unsafe
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write in {path}: {exc.strerror or exc}"
    try:
        FileLog(path).check()
    except LogLocked:
        return None  # `_own_the_log` names the holder
    except LogCorrupted as exc:
        return (f"{exc} (`imdispatch verify --log {path}` says more; `imdispatch recover "
                f"--log {path} --salvage` keeps the records before the damage)")
    except EventLogError as exc:
        return str(exc)
    except OSError as exc:  # a LOCK that is a directory, an immutable segment, ...
        where = Path(path) / exc.filename if exc.filename else Path(path)
        return f"cannot open {where} for writing: {exc.strerror or exc}"
    return None


def _pass_reload(config: Any, app: Any) -> None:
    """SIGHUP to the supervisor of several workers: pass it to the leader (its pid is in
    the event log's LOCK file), which reloads and records the changes; in cluster mode
    to every worker (each records what the file changes, so the first one does)."""
    from pathlib import Path

    if config.eventlog.clustered:
        manager = getattr(app, "manager", None)
        for process in getattr(manager, "transient_processes", ()):
            with contextlib.suppress(OSError, TypeError):
                os.kill(process.pid, signal.SIGHUP)
        return
    try:
        pid = int((Path(config.eventlog.path) / "LOCK").read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as exc:
        print(f"imdispatch: cannot pass SIGHUP to the leader: {exc}", file=sys.stderr)


def _note_torn(torn: Any) -> None:
    if torn is not None:
        print(f"note: {torn.describe()}; the dispatcher truncates it when it opens the log "
              "(or a writer is appending right now)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from dispatcher.domain.errors import DomainError
    from dispatcher.eventlog.errors import EventLogError, LogCorrupted

    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        from dispatcher.demo import main as demo

        return demo.run(args)
    if args.command == "selfcheck":
        from core_ext import selfcheck

        return 0 if selfcheck.run() else 1
    handler = {"replay": _replay, "audit": _audit, "verify": _verify, "recover": _recover}[
        args.command
    ]
    try:
        return handler(args)
    except BrokenPipeError:  # `imdispatch audit ... | head`
        return 0
    except (LogCorrupted, DomainError) as exc:  # the log's content is wrong
        print(f"imdispatch {args.command}: {exc}", file=sys.stderr)
        if args.command == "recover":
            print("to keep the records before it and drop the rest: imdispatch recover "
                  f"--log {args.log} --salvage", file=sys.stderr)
        return 1
    except (EventLogError, OSError) as exc:  # unreadable: locked, newer format, no log
        print(f"imdispatch {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

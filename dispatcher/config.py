"""The dispatcher's TOML configuration (`imdispatch serve --config dispatcher.toml`).

    [http]     host, port, workers, retry_after
    [nats]     servers, user, password, token, creds, nkey_seed, tls_ca, tls_cert, tls_key
    [poll]     interval, timeout, rise, fall, stale_after
    [balance]  high_watermark, low_watermark, slow_start, panic_threshold, load_step,
               assign_rate
    [eventlog] backend, path, fsync, snapshot_every, segment_bytes (the file log);
               stream, replicas, lease (JetStream: cluster mode);
               keep_snapshots, retain_events, retain_days (bounded history, both)
    [[nodes]]  id, ip, port, weight

Every table and key is optional except each node's `id`, `ip` and `port`; an unknown
table or key, a wrong type or an out-of-range value is a `ConfigError` naming the file,
the line and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import core_ext
from dispatcher.domain.decisions import NODE_ID
from imnode.contract import host_port, node_address

log = logging.getLogger("imdispatch")


class ConfigError(ValueError):
    """A configuration the dispatcher refuses; the message names file, line and key."""


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    retry_after: int = 5  # seconds a refused client waits (Retry-After: this to twice this)
    backlog: int = 1024  # connections the kernel queues before accepting: a reconnect storm
    rate_limit_per_ip: float = 0.0  # get-tcp-ip requests a second per client address; 0: off
    admin_listen: str | None = None  # "HOST:PORT": admin API, /metrics, /dashboard only there
    fast_path: bool = True  # get-tcp-ip answered by the compiled fast path (false: Sanic's route)

    def admin_address(self) -> tuple[str, int] | None:
        """`admin_listen` as (host, port), or None: the admin side is on the public port."""
        return None if self.admin_listen is None else listen_address(self.admin_listen)


@dataclass(frozen=True)
class NatsConfig:
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None  # a .creds file (JWT + nkey seed)
    nkey_seed: str | None = None  # a file with an nkey seed
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True)
class PollConfig:
    interval: float = 1.0  # seconds between status requests to every node
    timeout: float = 0.5  # for one status reply
    rise: int = 2  # successes in a row before a node is up
    fall: int = 2  # failures in a row before it is down ("no responders" counts as all)
    stale_after: float = 10.0  # no full poll cycle for this long: /readyz says not ready


@dataclass(frozen=True)
class BalanceConfig:
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    slow_start: float = 30.0  # seconds a node that came up ramps to its full weight; 0: off
    panic_threshold: float = 0.5  # share of nodes up below which health is ignored
    load_step: float = 0.01  # a load report is recorded when it moved this share of capacity
    assign_rate: float = 0.0  # most new clients per node per second; 0: capacity / 10


@dataclass(frozen=True)
class EventLogConfig:
    backend: str = "file"  # "jetstream": replicas share one stream (cluster mode)
    path: str = "imdispatch-events"
    fsync: str = "batch"
    snapshot_every: int = 10_000
    segment_bytes: int = 64 * 1024 * 1024
    stream: str = "IMDISPATCH"
    replicas: int = 1  # JetStream replicas of the stream and of the cluster's buckets
    lease: float = 3.0  # seconds a silent leader keeps the lead
    # Bounded history (`dispatcher.eventlog.retention`, both backends): events go only up to
    # the oldest kept snapshot, in whole units, when a non-zero limit lets them; 0 and 0
    # keep every event (the default).
    keep_snapshots: int = 2  # snapshots kept, newest first (never the history's anchor)
    retain_events: int = 0  # 0: no count limit; else older than the newest N may go
    retain_days: float = 0.0  # 0: no age limit; else recorded more than N days ago may go

    @property
    def clustered(self) -> bool:
        return self.backend == "jetstream"


@dataclass(frozen=True)
class NodeEntry:
    id: str
    ip: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class Config:
    http: HttpConfig = field(default_factory=HttpConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    eventlog: EventLogConfig = field(default_factory=EventLogConfig)
    nodes: tuple[NodeEntry, ...] = ()
    source: str = "<defaults>"

    def recorded(self) -> dict[str, Any]:
        """What a `config_reloaded` event keeps: every setting a reload changes for every
        worker (`RELOADABLE`: no secrets, nothing fixed at start) and the nodes, the base
        that the next reload is diffed against. Followers take their settings from it
        (`with_recorded`), never from the file, so all workers agree."""
        recorded: dict[str, Any] = {
            table: {key: getattr(getattr(self, table), key) for key in keys}
            for table, keys in RELOADABLE.items()
        }
        recorded["nodes"] = [asdict(node) for node in self.nodes]
        return recorded

    def with_recorded(self, recorded: dict[str, Any] | None) -> Config:
        """This configuration with the reloadable settings and the nodes of a
        `config_reloaded` event (`recorded()`), so that its `recorded()` is that event's;
        a table an older log did not record keeps this one's values. The values are
        checked as the file's are: a log is input too."""
        if not recorded:
            return self

        def error(where: str) -> Callable[[str | None, str], ConfigError]:
            return lambda key, problem: ConfigError(
                f"the recorded configuration: {where} {key}: {problem}")

        changes: dict[str, Any] = {}
        for table, keys in RELOADABLE.items():
            values = {key: value for key, value in recorded.get(table, {}).items()
                      if key in keys}
            changes[table] = replace(getattr(self, table),
                                     **_checked(values, TABLES[table][1], error(f"[{table}]")))
        changes["nodes"] = tuple(NodeEntry(**_checked(node, NODE_KEYS, error("[[nodes]]")))
                                 for node in recorded.get("nodes", []))
        return replace(self, **changes, source=FROM_LOG)


FROM_LOG = "<the event log>"
"""The `source` of a configuration taken from the log (`with_recorded`): a leader that
starts with one (taking over from a dead leader, or replacing a dead worker) continues
from the log; only a configuration read from the file is applied."""


# -- checks ----------------------------------------------------------------------------

Check = Callable[[Any], Any]  # returns the value (normalised) or raises ValueError


def _number(low: float, high: float = math.inf, *, low_open: bool = False) -> Check:
    def check(value: Any) -> float:
        if type(value) not in (int, float):
            raise ValueError(f"must be a number, got {value!r}")
        if not math.isfinite(value) or value > high or value < low or (
            low_open and value == low
        ):
            bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise ValueError(f"must be in {bound}, got {value!r}")
        return float(value)

    return check


def _integer(low: int, high: int) -> Check:
    def check(value: Any) -> int:
        if type(value) is not int:
            raise ValueError(f"must be an integer, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be in {low}..{high}, got {value}")
        return value

    return check


def _string(value: Any) -> str:
    if type(value) is not str or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _stream_name(value: Any) -> str:
    from dispatcher.eventlog.jetstream import check_stream_name

    return check_stream_name(value)


def _secret(value: Any) -> str:
    """A password or token: checked like a string, never repeated in the message."""
    if type(value) is not str or not value:
        raise ValueError(f"must be a non-empty string, got a {type(value).__name__}")
    return value


def _boolean(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(map(repr, options))}, got {value!r}")
        return value

    return check


def _servers(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a list of nats:// URLs, got {value!r}")
    for url in value:
        if not isinstance(url, str) or not re.match(r"(nats|tls|ws|wss)://[^\s]+\Z", url):
            raise ValueError(f"must be nats://HOST:PORT URLs, got {url!r}")
    return tuple(value)


def _ip(value: Any) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise ValueError(
            f"must be an IP address (clients get no DNS lookup), got {value!r}"
        ) from None


def listen_address(value: Any) -> tuple[str, int]:
    """"HOST:PORT" (an IP address; IPv6 in brackets) -> (host, port)."""
    if not isinstance(value, str):
        raise ValueError(f'must be "HOST:PORT", got {value!r}')
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        if (not sep or not port.isdigit() or not 1 <= int(port) <= 65535
                or (":" in host) != bracketed):
            raise ValueError
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        raise ValueError(f'must be "HOST:PORT" with an IP address and a port 1-65535 '
                         f'("[::1]:9090" for IPv6), got {value!r}') from None


def _listen(value: Any) -> str:
    host, port = listen_address(value)
    return host_port(host, port)


def _node_id(value: Any) -> str:
    if not isinstance(value, str) or not NODE_ID.match(value):
        raise ValueError(
            f"must be 1-64 letters, digits, '-' or '_' (a NATS subject token), got {value!r}"
        )
    return value


def _watermark(high: bool) -> Check:
    """Checked by the selection core itself, the one judge of what it accepts (a share
    too small for its parts per million is refused here, not after nodes changed)."""

    def check(value: Any) -> float:
        try:
            core_ext.watermarks_ppm(value, value) if high else core_ext.watermarks_ppm(1, value)
        except core_ext.InvalidArgument as exc:
            raise ValueError(f"the selection core refuses it: {exc}") from None
        return float(value)

    return check


PORT = _integer(1, 65535)

TABLES: dict[str, tuple[type, dict[str, Check]]] = {
    "http": (HttpConfig, {"host": _ip, "port": _integer(0, 65535), "workers": _integer(1, 64),
                          "retry_after": _integer(1, 3600), "backlog": _integer(1, 65535),
                          "rate_limit_per_ip": _number(0.0, 1e9), "admin_listen": _listen,
                          "fast_path": _boolean}),
    "nats": (NatsConfig, {
        "servers": _servers, "user": _string, "password": _secret, "token": _secret,
        "creds": _string, "nkey_seed": _string, "tls_ca": _string, "tls_cert": _string,
        "tls_key": _string,
    }),
    "poll": (PollConfig, {
        "interval": _number(0.05, 3600.0), "timeout": _number(0.01, 60.0),
        "rise": _integer(1, 100), "fall": _integer(1, 100),
        "stale_after": _number(0.1, 86_400.0),
    }),
    "balance": (BalanceConfig, {
        "high_watermark": _watermark(high=True), "low_watermark": _watermark(high=False),
        "slow_start": _number(0.0, 3600.0), "panic_threshold": _number(0.0, 1.0),
        "load_step": _number(0.0, 0.5, low_open=True),
        "assign_rate": _number(0.0, 1e9),
    }),
    "eventlog": (EventLogConfig, {
        "backend": _choice("file", "jetstream"),
        "path": _string, "fsync": _choice("always", "batch", "never"),
        "snapshot_every": _integer(1, 10**9), "segment_bytes": _integer(4096, 1 << 30),
        "stream": _stream_name, "replicas": _integer(1, 5), "lease": _number(1.0, 60.0),
        "keep_snapshots": _integer(1, 1000), "retain_events": _integer(0, 10**12),
        "retain_days": _number(0.0, 36_500.0),
    }),
}
RELOADABLE: dict[str, tuple[str, ...]] = {
    "http": ("retry_after",),
    "poll": tuple(f.name for f in fields(PollConfig)),
    "balance": tuple(f.name for f in fields(BalanceConfig)),
}
"""The settings a reload changes, recorded in the log; the rest of [http], [nats] and
[eventlog] hold from start to stop (and [nats] has secrets, which the log never keeps)."""
NODE_KEYS: dict[str, Check] = {
    "id": _node_id, "ip": node_address, "port": PORT, "weight": _integer(0, core_ext.MAX_WEIGHT),
}


# -- locating keys in the file ---------------------------------------------------------

_HEADER = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
_KEY = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


class _Lines:
    """Line numbers of tables and keys, found by a plain scan of the text (tomllib keeps
    none): `[table]`, `[[table]]` by occurrence, and `key =` inside them."""

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str, int], int] = {}
        self.keys: dict[tuple[str, int, str], int] = {}
        current, counts = ("", 0), {}
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                name = header.group(2)
                index = counts.get(name, 0) if header.group(1) == "[[" else 0
                counts[name] = index + 1
                current = (name, index)
                self.tables.setdefault(current, number)
                continue
            key = _KEY.match(line)
            if key:
                self.keys.setdefault((*current, key.group(1)), number)

    def of(self, table: str, index: int = 0, key: str | None = None) -> int | None:
        if key is not None and (table, index, key) in self.keys:
            return self.keys[table, index, key]
        return self.tables.get((table, index))


# -- loading ---------------------------------------------------------------------------

def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    config = parse(text, str(path))
    if not config.nodes:  # legal (nodes may come through the admin API), rarely meant
        log.warning("%s has no [[nodes]]: get-tcp-ip has nothing to route unless the event "
                    "log has nodes from the admin API; add [[nodes]] tables (id, ip, port) "
                    "and reload (SIGHUP), or POST /admin/nodes", config.source)
    return config


def parse(text: str, source: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    lines = _Lines(text)

    def error(table: str, index: int, key: str | None, problem: str) -> ConfigError:
        line = lines.of(table, index, key)
        where = f"{source}:{line}" if line else source
        name = f"[{table}]" if table != "nodes" else f"[[nodes]] #{index + 1}"
        return ConfigError(f"{where}: {name}{' ' + key if key else ''}: {problem}")

    sections: dict[str, Any] = {}
    for table, value in raw.items():
        if table == "nodes":
            continue
        if table not in TABLES:
            known = ", ".join(f"[{name}]" for name in (*TABLES, "[nodes]"))
            raise error(table, 0, None, f"unknown table (known: {known})")
        if not isinstance(value, dict):
            raise error(table, 0, None, "must be a table")
        cls, checks = TABLES[table]
        sections[table] = cls(**_checked(value, checks, lambda k, p, t=table: error(t, 0, k, p)))

    nodes = raw.get("nodes", [])
    if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
        raise error("nodes", 0, None, "must be an array of tables: [[nodes]]")
    entries, seen = [], {}
    for index, node in enumerate(nodes):
        where = lambda k, p, i=index: error("nodes", i, k, p)  # noqa: E731
        if index == core_ext.MAX_NODES:
            raise where(None, f"a dispatcher routes at most {core_ext.MAX_NODES} nodes")
        values = _checked(node, NODE_KEYS, where)
        for required in ("id", "ip", "port"):
            if required not in values:
                raise where(None, f"`{required}` is required")
        if values["id"] in seen:
            raise where("id", f"duplicate node id {values['id']!r} "
                              f"(also [[nodes]] #{seen[values['id']] + 1})")
        seen[values["id"]] = index
        entries.append(NodeEntry(**values))

    config = Config(**sections, nodes=tuple(entries), source=source)
    for key in ("creds", "nkey_seed", "tls_ca", "tls_cert", "tls_key"):
        file = getattr(config.nats, key)
        if file is not None and not Path(file).is_file():
            raise error("nats", 0, key, f"no such file: {file}")
    log_path = Path(config.eventlog.path)
    if log_path.exists() and not log_path.is_dir():
        raise error("eventlog", 0, "path", f"{log_path} exists and is not a directory")
    if config.http.workers > 1 and len(str(log_path.resolve() / "admin.sock")) > 100:
        raise error("eventlog", 0, "path", "too long for the workers' Unix socket "
                    "(at most about 90 characters with several workers)")
    admin = config.http.admin_address()
    if admin is not None and admin[1] == config.http.port:
        raise error("http", 0, "admin_listen", f"must not be the public port ({admin[1]})")
    balance = config.balance
    try:
        core_ext.watermarks_ppm(balance.high_watermark, balance.low_watermark)
    except core_ext.InvalidArgument:
        raise error("balance", 0, "low_watermark",
                    f"must not be above high_watermark ({balance.high_watermark})") from None
    if config.poll.timeout >= config.poll.interval:
        raise error("poll", 0, "timeout",
                    f"must be shorter than interval ({config.poll.interval})")
    return config


def _checked(values: dict[str, Any], checks: dict[str, Check],
             error: Callable[[str | None, str], ConfigError]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key not in checks:
            raise error(key, f"unknown key (known: {', '.join(checks)})")
        try:
            out[key] = checks[key](value)
        except ValueError as exc:
            raise error(key, str(exc)) from None
    return out


"""`imnode`: the IM node's command line (also `python -m imnode`).

    imnode serve --id ID --listen HOST:PORT [--advertise IP:PORT] --nats URL --capacity N
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from importlib.metadata import version

from imnode import logs
from imnode.contract import NODE_ID, node_address
from imnode.natsauth import connect_options


def _node_id(text: str) -> str:
    if not NODE_ID.match(text):
        raise argparse.ArgumentTypeError(
            f"node id must be 1-64 letters, digits, '-' or '_' (a NATS subject token): {text!r}"
        )
    return text


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _ip_port(text: str) -> tuple[str, int]:
    host, port = _host_port(text)
    try:
        host = node_address(host)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"the advertised address {exc}") from None
    if port == 0:
        raise argparse.ArgumentTypeError("the advertised port cannot be 0")
    return host, port


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imnode", description="TCP long-connection IM server balanced by imdispatch."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('imdispatch')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run a node")
    serve.add_argument("--id", required=True, type=_node_id, help="this node's id")
    serve.add_argument("--listen", required=True, type=_host_port, metavar="HOST:PORT",
                       help="where clients connect (port 0: any free port)")
    serve.add_argument("--advertise", type=_ip_port, metavar="IP:PORT",
                       help="the address the dispatcher hands to clients (default: --listen)")
    serve.add_argument("--nats", required=True, metavar="URL",
                       help="NATS server URL(s), comma-separated")
    serve.add_argument("--capacity", required=True, type=_positive(int),
                       help="most client connections; past it new ones get error busy")
    serve.add_argument("--heartbeat-interval", type=_positive(float), default=30.0,
                       metavar="S", help="clients ping at least this often (default 30)")
    serve.add_argument("--missed-heartbeats", type=_positive(int), default=3, metavar="N",
                       help="a client silent for N intervals is closed (default 3)")
    serve.add_argument("--hello-timeout", type=_positive(float), default=10.0, metavar="S")
    serve.add_argument("--drain-window", type=_positive(float), default=10.0, metavar="S",
                       help="goaway reconnect delays are spread over this window (default 10)")
    serve.add_argument("--drain-timeout", type=_positive(float), default=60.0, metavar="S",
                       help="after this, clients still connected are closed (default 60)")
    serve.add_argument("--nats-user", metavar="USER",
                       help="NATS user; the password comes from $IMNODE_NATS_PASSWORD (a "
                            "token, if used instead, from $IMNODE_NATS_TOKEN)")
    serve.add_argument("--nats-creds", metavar="FILE", help="NATS .creds file (JWT + nkey)")
    serve.add_argument("--nats-nkey", metavar="FILE", help="file with a NATS nkey seed")
    serve.add_argument("--nats-tls-ca", metavar="FILE", help="CA bundle for NATS over TLS")
    serve.add_argument("--nats-tls-cert", metavar="FILE", help="client certificate for TLS")
    serve.add_argument("--nats-tls-key", metavar="FILE", help="its private key")
    serve.add_argument("--metrics-listen", type=_host_port, metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (off)")
    serve.add_argument("--log-level", default="info", choices=logs.LEVELS)
    serve.add_argument("--log-format", default="auto", choices=logs.FORMATS,
                       help="json: one object per line; text: for people; auto (default): "
                            "text on a terminal, else json")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from imnode import app
    from imnode.server import NodeConfig

    host, port = args.listen
    if args.advertise is None:  # clients are sent where it listens: the same rule
        try:
            if ipaddress.ip_address(host).is_unspecified:
                parser.error("--advertise IP:PORT is needed when listening on all interfaces")
        except ValueError:
            parser.error(f"--listen needs an IP address, got {host!r}")
        try:
            node_address(host)
        except ValueError as exc:
            parser.error(f"--advertise IP:PORT is needed: the --listen address {exc}")
    if args.drain_timeout < args.drain_window:
        parser.error("--drain-timeout must not be shorter than --drain-window")
    logs.configure(args.log_level, args.log_format)
    config = NodeConfig(
        node_id=args.id, host=host, port=port, advertise=args.advertise,
        capacity=args.capacity, heartbeat_interval=args.heartbeat_interval,
        missed_heartbeats=args.missed_heartbeats, hello_timeout=args.hello_timeout,
        drain_window=args.drain_window, drain_timeout=args.drain_timeout,
        version=version("imdispatch"),
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with sanic on Linux
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(app.run(config, args.nats.split(","), nats_options=connect_options(
            user=args.nats_user, password=os.environ.get("IMNODE_NATS_PASSWORD"),
            token=os.environ.get("IMNODE_NATS_TOKEN"), creds=args.nats_creds,
            nkey_seed=args.nats_nkey, tls_ca=args.nats_tls_ca, tls_cert=args.nats_tls_cert,
            tls_key=args.nats_tls_key), metrics_listen=args.metrics_listen))
    except OSError as exc:  # e.g. the port is taken
        print(f"imnode: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

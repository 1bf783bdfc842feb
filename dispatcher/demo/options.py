"""The options of `imdispatch demo` (apart from the demo itself, so that building the
command line does not import it)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="imnodes to run (default 3)")
    parser.add_argument("--clients", type=int, default=300,
                        help="clients the population grows to (default 300)")
    parser.add_argument("--ramp", type=float, default=60.0,
                        help="seconds to reach that many clients (default 60)")
    parser.add_argument("--http-port", type=int, default=8080,
                        help="the dispatcher's port on 127.0.0.1 (default 8080)")
    parser.add_argument("--nats-port", type=int, default=None,
                        help="nats-server's port (default: a free one)")
    parser.add_argument("--node-base-port", type=int, default=None,
                        help="first imnode port, the others follow (default: free ones)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="dispatcher replicas, 2 to 5: run them on a three-server NATS "
                             "cluster sharing one JetStream history (ports --http-port, "
                             "+1, ...); the script then kills the leader replica and a "
                             "NATS server (default 1: one dispatcher, one nats-server)")
    parser.add_argument("--token", default="demo",
                        help="the admin API's bearer token (default 'demo')")
    parser.add_argument("--moment-every", type=float, default=15.0,
                        help="seconds between scripted moments; 0 turns them off")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep logs, config and the event log here (default: a "
                             "temporary directory, removed at the end)")

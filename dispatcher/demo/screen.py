"""What the demo shows: a table of the nodes, where clients went lately, the latest
events and what happens next. Pure functions of the figures, so they are testable; the
demo redraws the whole screen on a terminal and prints plain lines otherwise."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

ENVELOPE = {"type", "seq", "time", "actor", "reason", "node"}
QUIET_EVENTS = {"load_reported"}  # one per load change: too many to show
HOME_AND_CLEAR = "\x1b[H\x1b[2J"
DETAILS_WIDTH = 100


def bar(used: int, capacity: int | None, width: int = 12) -> str:
    if not capacity:
        return "[" + "?" * width + "]"
    filled = min(width, round(width * used / capacity))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def node_table(nodes: list[dict[str, Any]], shares: Counter[str]) -> list[str]:
    total = sum(shares.values())
    lines = [f"{'NODE':<6} {'WEIGHT':>6} {'EFFECTIVE':>9} {'HEALTH':<14} "
             f"{'CONNECTIONS':<27} {'SHARE 10s':>9}"]
    for node in nodes:
        health = node["health"] + (" drain" if node["draining"] else "") + (
            " FULL" if node["overloaded"] else "")
        connections, capacity = node["connections"] or 0, node["capacity"]
        used = f"{connections}/{capacity if capacity is not None else '?'}"
        share = f"{100 * shares[node['id']] / total:.0f}%" if total else "-"
        effective = f"{node['effective_weight']:.2f}" if node["health"] == "up" else "-"
        lines.append(f"{node['id']:<6} {node['weight']:>6} {effective:>9} "
                     f"{health:<14} {bar(connections, capacity)} {used:<13} {share:>9}")
    return lines


def replica_table(replicas: list[tuple[str, int, dict[str, Any] | None]],
                  answers: Counter[str], window: float = 10.0) -> list[str]:
    """One line per dispatcher replica from (name, port, its /readyz body or None when
    it does not answer), with the get-tcp-ip answers per second the clients got from it
    over the last `window` seconds (`answers` by replica name)."""
    lines = [f"{'REPLICA':<7} {'PORT':>5} {'ROLE':<8} {'STATE_SEQ':>9} {'READY':<5} "
             f"{'POLL AGE':>8} {'ANSWERS/s':>9}  MEMBER"]
    for name, port, ready in replicas:
        rate = f"{answers[name] / window:.1f}"
        if ready is None:
            lines.append(f"{name:<7} {port:>5} {'down':<8} {'-':>9} {'-':<5} {'-':>8} "
                         f"{rate:>9}")
            continue
        age = ready.get("last_poll_age_s")
        lines.append(f"{name:<7} {port:>5} {ready.get('role', '?'):<8} "
                     f"{ready.get('state_seq', '?'):>9} {'yes' if ready.get('ready') else 'no':<5} "
                     f"{'-' if age is None else f'{age:.1f} s':>8} {rate:>9}  "
                     f"{ready.get('member', '')}")
    return lines


def event_line(event: dict[str, Any]) -> str:
    details = " ".join(f"{k}={v}" for k, v in event.items()
                       if k not in ENVELOPE and v not in (None, ""))
    if len(details) > DETAILS_WIDTH:
        details = details[:DETAILS_WIDTH - 3] + "..."
    when = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    reason = f" ({event['reason']})" if event.get("reason") else ""
    node = f" {event['node']}" if event.get("node") else ""
    return (f"#{event.get('seq')} {when} {event.get('type')}{node} by {event.get('actor')}"
            f"{reason}{' ' + details if details else ''}")


def visible(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event.get("type") not in QUIET_EVENTS]


NATS_CLI = ("  (nats is natscli: https://github.com/nats-io/natscli/releases or "
            "go install github.com/nats-io/natscli/nats@latest)")


def hints(url: str, nats_url: str, token: str, events_path: str, node_id: str, *,
          imdispatch: str = "imdispatch", nats_installed: bool = True,
          stream: str | None = None) -> list[str]:
    """What to try while the demo runs: HTTP with curl, NATS with the nats CLI, the log
    with `imdispatch` (named as it runs from here: `make demo` activates no venv); the
    JetStream `stream` instead of the file log at `events_path` when one is given."""
    auth = f"-H 'Authorization: Bearer {token}'"
    history = (f"--nats {nats_url} --stream {stream}" if stream is not None
               else f"--log {events_path}")
    return [
        f"  open {url}/dashboard in a browser",
        f"  curl {url}/metrics",
        f"  curl '{url}/get-tcp-ip?uid=alice&count=2'",
        f"  curl {url}/readyz",
        f"  curl {auth} {url}/admin/nodes",
        f"  curl {auth} '{url}/admin/events?after=0&limit=20'",
        f"  curl {auth} -X PUT -d '{{\"weight\": 4, \"reason\": \"try\"}}' "
        f"{url}/admin/nodes/{node_id}",
        f"  nats -s {nats_url} micro ls",
        f"  nats -s {nats_url} req imdispatch.pick '{{\"uid\": \"alice\"}}'",
        f"  nats -s {nats_url} req imdispatch.nodes ''",
        f"  nats -s {nats_url} req imnode.{node_id}.status ''",
        *([f"  nats -s {nats_url} stream info {stream}"] if stream is not None else []),
        *([] if nats_installed else [NATS_CLI]),
        f"  {imdispatch} audit {history}",
    ]


def summary(elapsed: float, connected: int, target: int, refused: int, sent: int,
            delivered: int, failed: int) -> str:
    return (f"imdispatch demo  {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}  "
            f"clients {connected}/{target} connected, {refused} refused (503) in 10 s; "
            f"messages {sent} sent, {delivered} delivered, {failed} failed")


def screen(head: str, table: list[str], events: list[dict[str, Any]], upcoming: str,
           tips: list[str], replicas: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """The whole terminal screen (the replicas' table and the script's notes, if any,
    below the nodes)."""
    return "\n".join([
        HOME_AND_CLEAR + head, "", *table, "",
        *([*replicas, ""] if replicas else []),
        *(["what the script saw:", *(f"  {note}" for note in notes[-6:]), ""] if notes else []),
        "latest events (load reports hidden):",
        *(f"  {event_line(event)}" for event in events[-8:]),
        "", upcoming, "", "try:", *tips,
        "", "keys: n = next moment now, q = quit (or Ctrl-C)", "",
    ])

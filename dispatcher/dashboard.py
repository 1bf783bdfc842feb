"""`GET /dashboard`: one self-contained page (no CDN, no framework) that polls
`GET /dashboard/data` every two seconds: the nodes, where clients went lately, the latest
routing changes and the dispatcher's own state. Read-only: admin actions stay on the
authenticated API."""

from __future__ import annotations

import time
from importlib.resources import files
from typing import Any

from dispatcher.stats import HISTORY_SECONDS

SHARE_WINDOW = 60  # seconds of assignments behind each node's "recent share"
EVENTS_SHOWN = 20


PAGE = files("dispatcher").joinpath("static/dashboard.html").read_bytes()


def page() -> bytes:
    """The page, read once at import: a request needs no file (at the file limit there
    is none to be had, and each request was a 500)."""
    return PAGE


def data(snapshot: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    """What the page shows: a worker's `Serving.snapshot()` and everyone's figures."""
    details = snapshot["details"]
    now = int(time.time())
    seconds = range(now - HISTORY_SECONDS, now)  # whole seconds that ended
    history = figures["history"]
    nodes = snapshot["nodes"]
    ids = [node["id"] for node in nodes]
    chart = {node: [history.get(second, {}).get(node, 0) for second in seconds]
             for node in ids}
    recent = {node: sum(chart[node][-SHARE_WINDOW:]) for node in ids}
    total = sum(recent.values())
    return {
        "generated": time.time(),
        "dispatcher": {
            "ready": snapshot["ready"], "reason": details.get("reason"),
            "role": snapshot["role"], "panic": details["panic"],
            "nats_connected": details["nats_connected"], "state_seq": details["state_seq"],
            "last_poll_age_s": details["last_poll_age_s"],
            "stale_after_s": details["stale_after_s"], "event_log": details["event_log"],
            "workers": figures["workers"],
            "picks": picks(figures),
            "refused": {f"{via} {reason}": count
                        for (via, reason), count in sorted(figures["refusals"].items())},
        },
        "nodes": [{
            "id": node["id"], "address": f"{node['ip']}:{node['port']}",
            "weight": node["weight"], "effective_weight": node["effective_weight"],
            "health": node["health"], "health_cause": node["health_cause"],
            "draining": node["draining"], "overloaded": node["overloaded"],
            "connections": node["connections"], "capacity": node["capacity"],
            "recent_share": recent[node["id"]] / total if total else None,
            "assigned_total": figures["assignments"].get(node["id"], 0),
            "assigned_nats": figures["nats_assignments"].get(node["id"], 0),
        } for node in nodes],
        "chart": {"start": seconds.start, "step_s": 1, "per_node": chart},
        "events": snapshot["changes"][-EVENTS_SHOWN:][::-1],
    }


def picks(figures: dict[str, Any]) -> dict[str, int]:
    """Clients assigned since start, by how they asked: get-tcp-ip or `imdispatch.pick`."""
    nats = sum(figures["nats_assignments"].values())
    return {"http": sum(figures["assignments"].values()) - nats, "nats": nats}

"""Admin commands: what `/admin/*` does, whichever worker received the request.

Each command is an operation name, its arguments (the decoded JSON body, plus the node id
from the path) and the actor (the token's name). The worker that writes the event log
runs them with `execute`; other workers send them to it (see `dispatcher.leader`).
Every change is an event recording the actor and the optional `reason`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

from dispatcher import config as cfg
from dispatcher.domain import decisions
from dispatcher.domain.errors import DomainError
from dispatcher.eventlog.errors import EventLogError, LogUnavailable, RecordTooLarge
from dispatcher.eventlog.filelog import LogReader

Reply = tuple[int, Any]
log = logging.getLogger("imdispatch.admin")
FIELDS = {
    "add": {"id", "ip", "port", "weight", "reason"},
    "update": {"node_id", "ip", "port", "weight", "draining", "reason"},
    "remove": {"node_id", "reason"},
    "events": {"after", "limit"},
    "nodes": set(),
    "reload": set(),
    "status": set(),
}
STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (decisions.UnknownNode, 404),
    (decisions.NodeExists, 409),
    (decisions.TooManyNodes, 409),
    (DomainError, 400),
    (cfg.ConfigError, 400),
)
"""Domain and configuration errors as HTTP statuses, by type (most specific first)."""


class AdminError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _reason(args: dict[str, Any]) -> str | None:
    reason = args.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
        raise AdminError(400, "`reason` must be a string of at most 500 characters")
    return reason


async def execute(runtime: Any, op: str, args: dict[str, Any], actor: str) -> Reply:
    """Run one admin command on the runtime that owns the journal."""
    if op not in FIELDS:
        return 400, {"error": f"unknown admin operation {op!r}"}
    unknown = set(args) - FIELDS[op]
    if unknown:
        return 400, {"error": f"unknown fields: {', '.join(sorted(unknown))}"}
    try:
        return await _OPERATIONS[op](runtime, args, actor)
    except AdminError as exc:
        return exc.status, {"error": str(exc)}
    except (DomainError, cfg.ConfigError) as exc:
        status = next(status for kind, status in STATUS_OF if isinstance(exc, kind))
        return status, {"error": str(exc)}
    except RecordTooLarge as exc:  # refused before anything changed: bad input
        return 413, {"error": f"nothing changed: {exc}"}
    except LogUnavailable as exc:  # cluster mode: the stream did not take it (now)
        return 503, {"error": f"not recorded: {exc}"}
    except EventLogError as exc:  # a full disk, say: the change is not durable
        log.error("admin %s: the event log cannot record it: %s", op, exc)
        return 503, {"error": "the event log cannot record changes, so this one (if it "
                              "was valid) holds in this process only until it restarts, "
                              f"and the dispatcher is not ready: {exc}"}


async def _nodes(runtime: Any, args: dict[str, Any], actor: str) -> Reply:
    if runtime.journal is not None:  # a follower worker forwards this: no journal
        await runtime.journal.read_barrier()
    return 200, runtime.state.node_views()


async def _recorded(runtime: Any, decide: Callable[[Any], list], node_id: str,
                    status: int) -> Reply:
    """Record a change to one node and answer with the node as it then is. Another
    command may remove the node while the change is written (the loop runs it between
    this change being applied and being durable): the change stands recorded, so the
    answer is a 409 that says so, listing the recorded events, not a 500."""
    recorded = await runtime.journal.commit(decide)
    if node_id not in runtime.state.nodes:
        return 409, {"error": f"node {node_id!r} was removed by another command while this "
                              "change was being recorded; the change is in the log "
                              "before the removal",
                     "recorded": [event.to_dict() for event in recorded]}
    return status, runtime.state.node_view(node_id)


async def _add(runtime: Any, args: dict[str, Any], actor: str) -> Reply:
    reason = _reason(args)
    return await _recorded(runtime, lambda state: decisions.add_node(
        state, args.get("id"), args.get("ip"), args.get("port"), args.get("weight", 1),
        actor=actor, reason=reason), args.get("id"), 201)


async def _update(runtime: Any, args: dict[str, Any], actor: str) -> Reply:
    node_id, reason = args.get("node_id"), _reason(args)

    def decide(state: Any) -> list:
        if node_id not in state.nodes:
            raise decisions.UnknownNode(f"unknown node {node_id!r}")
        record, events = state.nodes[node_id], []
        if "ip" in args or "port" in args:
            events += decisions.change_address(state, node_id, args.get("ip", record.ip),
                                               args.get("port", record.port), actor=actor,
                                               reason=reason)
        if "weight" in args:
            events += decisions.set_weight(state, node_id, args["weight"], actor=actor,
                                           reason=reason)
        if "draining" in args:
            events += decisions.set_draining(state, node_id, args["draining"], actor=actor,
                                             reason=reason)
        return events

    return await _recorded(runtime, decide, node_id, 200)


async def _remove(runtime: Any, args: dict[str, Any], actor: str) -> Reply:
    node_id, reason = args.get("node_id"), _reason(args)
    await runtime.journal.commit(
        lambda state: decisions.remove_node(state, node_id, actor=actor, reason=reason))
    return 200, {"removed": node_id}


async def _events(runtime: Any, args: dict[str, Any], actor: str) -> Reply:
    after, limit = args.get("after", 0), args.get("limit", 100)
    if type(after) is not int or type(limit) is not int or after < 0 or not 1 <= limit <= 1000:
        raise AdminError(400, "`after` must be an integer >= 0 and `limit` one in 1..1000")
    return 200, await runtime.read_events(after, limit)


def read_file_events(path: str, after: int, limit: int) -> list[Any]:
    """Stored events after `after` in the file log at `path` (blocking: run in a
    thread)."""
    events = []
    for record in LogReader(path).records(after):
        events.append(orjson.loads(record.payload))
        if len(events) == limit:
            break
    return events


async def _reload(runtime: Any, args: dict[str, Any], actor: str) -> Reply:
    return 200, {"reloaded": True, "changes": await runtime.reload()}


async def _status(runtime: Any, args: dict[str, Any], actor: str) -> Reply:
    """For the other workers (no HTTP route): whether this runtime's event log failed or
    its NATS link delivers nothing, so that they stop saying ready at the moment it does."""
    failure = runtime.log_failure()
    return 200, {"event_log": "ok" if failure is None else "failed",
                 "failure": None if failure is None else str(failure),
                 "link_fault": runtime.link_fault()}


_OPERATIONS = {
    "nodes": _nodes, "add": _add, "update": _update, "remove": _remove,
    "events": _events, "reload": _reload, "status": _status,
}

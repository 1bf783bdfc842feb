"""The HTTP face of the dispatcher (Sanic): get-tcp-ip, health, readiness and the admin API.

Handlers are thin: they parse, call the runtime or a domain decision, and serialise with
orjson. `GET /get-tcp-ip` does no I/O: it picks from the in-memory routing state.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse

from dispatcher import config as cfg
from dispatcher.domain import decisions
from dispatcher.domain.errors import DomainError
from dispatcher.eventlog.filelog import LogReader
from dispatcher.query import QueryError, from_query
from dispatcher.runtime import Runtime

log = logging.getLogger("imdispatch.http")
TOKEN_VARIABLE = "IMDISPATCH_ADMIN_TOKEN"
_apps = itertools.count(1)
JSON = "application/json"


def respond(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> HTTPResponse:
    return HTTPResponse(orjson.dumps(body), status=status, headers=headers, content_type=JSON)


def error(status: int, message: str, **extra: Any) -> HTTPResponse:
    return respond({"error": message, **extra}, status)


def admin_tokens(value: str | None) -> list[tuple[str, bytes]]:
    """`IMDISPATCH_ADMIN_TOKEN`: comma-separated tokens, each `secret` or `name:secret`;
    the name (or "admin") is the actor recorded in the events a token's changes make."""
    tokens = []
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, secret = item.partition(":")
        actor = f"admin:{name}" if sep and name else "admin"
        tokens.append((actor, (secret if sep else item).encode()))
    return tokens


def create_app(runtime: Runtime, tokens: list[tuple[str, bytes]] | None = None) -> Sanic:
    app = Sanic(f"imdispatch_{next(_apps)}", configure_logging=False)
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.REQUEST_MAX_SIZE = 64 * 1024
    app.config.REQUEST_MAX_HEADER_SIZE = 16 * 1024
    app.config.REQUEST_TIMEOUT = 10
    app.config.KEEP_ALIVE_TIMEOUT = 30
    app.ctx.runtime = runtime

    @app.before_server_start
    async def start(app: Sanic) -> None:
        await runtime.start()

        def reload() -> None:
            app.add_task(_reload(runtime))

        app.loop.add_signal_handler(signal.SIGHUP, reload)

    @app.after_server_stop
    async def stop(app: Sanic) -> None:
        await runtime.stop()

    @app.exception(SanicException)
    async def http_error(request: Request, exc: SanicException) -> HTTPResponse:
        return error(exc.status_code, str(exc) or exc.__class__.__name__)

    @app.exception(Exception)
    async def unexpected(request: Request, exc: Exception) -> HTTPResponse:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error(500, "internal error")

    @app.get("/get-tcp-ip")
    async def get_tcp_ip(request: Request) -> HTTPResponse:
        try:
            pick = from_query(dict(request.args))  # name -> list, as Sanic stores them
        except QueryError as exc:
            return error(400, str(exc))
        chosen = runtime.choose(pick)
        if not chosen:
            wait = runtime.retry_after()
            return respond({"error": "no IM node can take a client now", "retry_after": wait},
                           503, {"Retry-After": str(wait)})
        answer = chosen[0].as_dict()
        if pick.count > 1:
            answer["backups"] = [choice.as_dict() for choice in chosen[1:]]
        return respond(answer)

    @app.get("/healthz")
    async def healthz(request: Request) -> HTTPResponse:
        return respond({"status": "alive"})

    @app.get("/readyz")
    async def readyz(request: Request) -> HTTPResponse:
        ready, details = runtime.readiness()
        return respond({"ready": ready, **details}, 200 if ready else 503)

    if tokens is None:
        tokens = admin_tokens(os.environ.get(TOKEN_VARIABLE))
    if tokens:
        _admin_routes(app, runtime, tokens)
    return app


def _read_events(path: str, after: int, limit: int) -> list[orjson.Fragment]:
    """Stored events after `after` (read in a thread: the log is on disk)."""
    events = []
    for record in LogReader(path).records(after):
        events.append(orjson.Fragment(record.payload))
        if len(events) == limit:
            break
    return events


async def _reload(runtime: Runtime) -> None:
    try:
        changes = await runtime.reload()
        log.info("configuration reloaded: %s", ", ".join(changes) or "no changes")
    except (cfg.ConfigError, DomainError) as exc:
        log.error("configuration not reloaded: %s", exc)


Handler = Callable[..., Awaitable[HTTPResponse]]


def _admin_routes(app: Sanic, runtime: Runtime, tokens: list[tuple[str, bytes]]) -> None:
    def authorised(handler: Handler) -> Handler:
        async def wrapper(request: Request, *args: Any, **kwargs: Any) -> HTTPResponse:
            header = request.headers.get("authorization", "")
            scheme, _, offered = header.partition(" ")
            actor = None
            if scheme.lower() == "bearer" and offered:
                for name, secret in tokens:  # constant time for each token
                    if hmac.compare_digest(offered.strip().encode(), secret):
                        actor = name
            if actor is None:
                return respond({"error": "a valid admin bearer token is required"}, 401,
                               {"WWW-Authenticate": "Bearer"})
            return await handler(request, actor, *args, **kwargs)

        wrapper.__name__ = handler.__name__
        return wrapper

    def body_of(request: Request) -> dict[str, Any]:
        if not request.body:
            return {}
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise QueryError(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise QueryError("the body must be a JSON object")
        return body

    def reason_of(body: dict[str, Any]) -> str | None:
        reason = body.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
            raise QueryError("`reason` must be a string of at most 500 characters")
        return reason

    async def change(events: list, status: int, answer: Any) -> HTTPResponse:
        await runtime.journal.record(events)
        return respond(answer() if callable(answer) else answer, status)

    def failed(exc: Exception) -> HTTPResponse:
        if isinstance(exc, decisions.InvalidCommand) and str(exc).startswith("unknown node"):
            return error(404, str(exc))
        return error(400, str(exc))

    @app.get("/admin/nodes")
    @authorised
    async def list_nodes(request: Request, actor: str) -> HTTPResponse:
        return respond(runtime.state.node_views())

    @app.post("/admin/nodes")
    @authorised
    async def add_node(request: Request, actor: str) -> HTTPResponse:
        try:
            body = body_of(request)
            unknown = set(body) - {"id", "ip", "port", "weight", "reason"}
            if unknown:
                raise QueryError(f"unknown fields: {', '.join(sorted(unknown))}")
            events = decisions.add_node(runtime.state, body.get("id"), body.get("ip"),
                                        body.get("port"), body.get("weight", 1), actor=actor,
                                        reason=reason_of(body))
        except (QueryError, DomainError) as exc:
            return failed(exc)
        return await change(events, 201, lambda: runtime.state.node_view(body["id"]))

    @app.put("/admin/nodes/<node_id>")
    @authorised
    async def update_node(request: Request, actor: str, node_id: str) -> HTTPResponse:
        state = runtime.state
        try:
            body = body_of(request)
            unknown = set(body) - {"ip", "port", "weight", "draining", "reason"}
            if unknown:
                raise QueryError(f"unknown fields: {', '.join(sorted(unknown))}")
            if node_id not in state.nodes:
                return error(404, f"unknown node {node_id!r}")
            reason, record, events = reason_of(body), state.nodes[node_id], []
            if "ip" in body or "port" in body:
                events += decisions.change_address(state, node_id, body.get("ip", record.ip),
                                                   body.get("port", record.port),
                                                   actor=actor, reason=reason)
            if "weight" in body:
                events += decisions.set_weight(state, node_id, body["weight"], actor=actor,
                                               reason=reason)
            if "draining" in body:
                events += decisions.set_draining(state, node_id, body["draining"],
                                                 actor=actor, reason=reason)
        except (QueryError, DomainError) as exc:
            return failed(exc)
        return await change(events, 200, lambda: state.node_view(node_id))

    @app.delete("/admin/nodes/<node_id>")
    @authorised
    async def remove_node(request: Request, actor: str, node_id: str) -> HTTPResponse:
        try:
            body = body_of(request)
            reason = reason_of(body) or request.args.get("reason")
            events = decisions.remove_node(runtime.state, node_id, actor=actor, reason=reason)
        except (QueryError, DomainError) as exc:
            return failed(exc)
        return await change(events, 200, {"removed": node_id})

    @app.get("/admin/events")
    @authorised
    async def list_events(request: Request, actor: str) -> HTTPResponse:
        try:
            after = int(request.args.get("after", "0"))
            limit = int(request.args.get("limit", "100"))
        except ValueError:
            return error(400, "`after` and `limit` must be integers")
        if after < 0 or not 1 <= limit <= 1000:
            return error(400, "`after` must be >= 0 and `limit` in 1..1000")
        events = await asyncio.to_thread(_read_events, runtime.config.eventlog.path, after, limit)
        return respond(events)

    @app.post("/admin/reload")
    @authorised
    async def reload(request: Request, actor: str) -> HTTPResponse:
        try:
            changes = await runtime.reload()
        except (cfg.ConfigError, DomainError) as exc:
            return error(400, str(exc))
        return respond({"reloaded": True, "changes": changes})

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
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
from sanic import Blueprint, Request, Sanic
from sanic.exceptions import MethodNotAllowed, NotFound, SanicException
from sanic.response import HTTPResponse

from dispatcher import config as cfg
from dispatcher import dashboard, http_server, leader_link
from dispatcher.domain.errors import DomainError
from dispatcher.follower import Follower
from dispatcher.get_tcp_ip import GetTcpIp
from dispatcher.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dispatcher.metrics import exposition
from dispatcher.query import QueryError
from dispatcher.runtime import open_runtime, take_over_when_leader_dies
from dispatcher.serving import Serving
from dispatcher.stats import DIRECTORY_VARIABLE, SharedStats
from imnode import logs
from imnode.tasks import cancel_and_wait

log = logging.getLogger("imdispatch.http")
TOKEN_VARIABLE = "IMDISPATCH_ADMIN_TOKEN"
_apps = itertools.count(1)
SUPERVISOR_CHECK = 0.5  # seconds between a worker's looks at whether its supervisor lives
ORPHAN_STOP = 30.0  # seconds an orphaned worker's graceful stop may take before it exits
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
        secret = (secret if sep else item).strip()
        if not secret:  # an empty secret would let an empty header in
            log.warning("ignored an admin token with an empty secret (%s)", actor)
            continue
        tokens.append((actor, secret.encode()))
    return tokens


def create_app(config: cfg.Config, config_path: str | None = None,
               tokens: list[tuple[str, bytes]] | None = None, log_level: str = "info",
               log_format: str = "auto", admin_socket: socket.socket | None = None) -> Sanic:
    """The app of one worker. Its runtime is opened when the server starts: the leader if
    this worker gets the event log's writer lock, else a follower of the leader's log.
    `admin_socket`: the `[http] admin_listen` socket, bound by `serve`."""
    logs.configure(log_level, log_format)  # in every worker process: each logs for itself
    app = Sanic(f"imdispatch_{next(_apps)}", configure_logging=False)
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.REQUEST_MAX_SIZE = 64 * 1024
    app.config.REQUEST_MAX_HEADER_SIZE = 16 * 1024
    app.config.REQUEST_TIMEOUT = 10
    app.config.KEEP_ALIVE_TIMEOUT = 30
    http_server.GuardedProtocol.cap = http_server.connection_cap()  # this worker's files
    holder: list[Serving] = []  # the runtime, once the server has started
    stats = SharedStats()

    @app.before_server_start
    async def start(app: Sanic) -> None:
        if os.environ.get(DIRECTORY_VARIABLE):  # one worker of several
            app.ctx.orphaned = app.loop.create_task(_stop_with_the_supervisor(app))
        # A worker started in place of a dead one holds the file as `serve` read it at
        # start, older than any reload since: it takes its settings from the log.
        replacement = os.environ.get(leader_link.REPLACEMENT)
        settings = replace(config, source=cfg.FROM_LOG) if replacement else config
        runtime = await open_runtime(settings, config_path, stats.own)
        holder.append(runtime)
        stats.start()
        log.info("worker %d serves as %s", os.getpid(), runtime.role)
        if isinstance(runtime, Follower):
            app.ctx.takeover = app.loop.create_task(_promote(holder, runtime))

        def reload() -> None:
            app.add_task(_reload(holder[0]))

        app.loop.add_signal_handler(signal.SIGHUP, reload)

    if admin_socket is not None:
        admin_side = http_server.AdminListener(admin_socket, config.http.backlog)
        app.after_server_start(admin_side.start)
        app.before_server_stop(lambda app: admin_side.stop())

    @app.before_server_stop
    async def no_takeover(app: Sanic) -> None:
        """All workers stop together: one must not take the log over as the leader goes."""
        await cancel_and_wait(getattr(app.ctx, "takeover", None),
                              getattr(app.ctx, "orphaned", None))

    @app.after_server_stop
    async def stop(app: Sanic) -> None:
        try:
            if holder:
                await holder[0].stop()
        except Exception as exc:  # a log that failed cannot be closed cleanly: say so
            log.error("stopped with the event log failed: %s", exc)
        finally:
            await stats.stop()

    hidden = config.http.admin_listen is not None  # the admin side on the public port

    @app.exception(SanicException)
    async def http_error(request: Request, exc: SanicException) -> HTTPResponse:
        if hidden and isinstance(exc, MethodNotAllowed) and _admin_path(request, exc):
            exc = NotFound(f"Requested URL {request.path} not found")  # no Allow to tell
        if request.route is None:  # no route (a 404, a request refused before routing)
            stats.own.request("other", exc.status_code)
        return respond({"error": str(exc) or exc.__class__.__name__}, exc.status_code,
                       exc.headers or None)  # a 405's Allow, say

    @app.exception(Exception)
    async def unexpected(request: Request, exc: Exception) -> HTTPResponse:
        log.exception("unexpected error in %s %s", request.method, request.path)
        if request.route is None or request.uri_template == "/get-tcp-ip":  # no middleware
            stats.own.request(request.uri_template or "other", 500)
        return error(500, "internal error")

    app.ctx.get_tcp_ip = answers = GetTcpIp(holder, stats.own, config.http.rate_limit_per_ip)

    @app.get("/get-tcp-ip")
    async def get_tcp_ip(request: Request) -> HTTPResponse:
        """The hot path (when the fast path is off, or not sure): no middleware; it
        counts itself."""
        status, body, retry_after = answers.answer(request.query_string, request.ip)
        return HTTPResponse(body, status, {"Retry-After": str(retry_after)} if retry_after
                            else None, content_type=JSON)

    ops = Blueprint(f"ops_{app.name}")  # every other route, counted by a middleware

    @ops.on_response
    async def count(request: Request, response: HTTPResponse) -> None:
        stats.own.request(request.uri_template or "other", response.status)

    @ops.route("/healthz", methods=["GET", "HEAD"])  # load balancers send HEAD
    async def healthz(request: Request) -> HTTPResponse:
        return respond({"status": "alive"})

    @ops.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(request: Request) -> HTTPResponse:
        if isinstance(holder[0], Follower):
            await holder[0].ask_leader()
        ready, details = holder[0].readiness()
        return respond({"ready": ready, **details}, 200 if ready else 503)

    async def gathered(render: Callable[[dict, dict], Any]) -> Any:
        """`render(snapshot, figures)` in a thread: the snapshot and this worker's figures
        are copied here on the loop, where they change; files are read in the thread."""
        snapshot, own = holder[0].snapshot(), stats.own.as_dict()

        def work() -> Any:
            return render(snapshot, stats.everyone(own))

        return await asyncio.to_thread(work)

    if config.http.admin_listen is not None:
        @ops.on_request
        async def admin_side_only(request: Request) -> HTTPResponse | None:
            """The admin side is unknown on the public port once it has a port of its own
            (an admin request is refused on its headers: its body is never read)."""
            if (getattr(request.route.ctx, "admin_side", False)
                    and not getattr(request.conn_info.ctx, "admin_side", False)):
                request.stream.refuse_body()
                return error(404, f"Requested URL {request.path} not found")
            return None

    @ops.get("/metrics", ctx_admin_side=True)
    async def metrics(request: Request) -> HTTPResponse:
        return HTTPResponse(await gathered(exposition), content_type=METRICS_CONTENT_TYPE)

    @ops.get("/dashboard", ctx_admin_side=True)
    async def dashboard_page(request: Request) -> HTTPResponse:
        return HTTPResponse(dashboard.page(), content_type="text/html; charset=utf-8")

    @ops.get("/dashboard/data", ctx_admin_side=True)
    async def dashboard_data(request: Request) -> HTTPResponse:
        return respond(await gathered(dashboard.data))

    if tokens is None:
        tokens = admin_tokens(os.environ.get(TOKEN_VARIABLE))
    if tokens:
        _admin_routes(ops, holder, tokens)
    app.blueprint(ops)
    return app


def _admin_path(request: Request, refused: MethodNotAllowed) -> bool:
    """Whether a 405 is for an admin-side path asked on the public port (its `Allow`
    would tell the path is there, and how to call it)."""
    if getattr(request.conn_info.ctx, "admin_side", False):
        return False
    allowed = (refused.headers or {}).get("Allow", "")
    for method in filter(None, (m.strip() for m in allowed.split(","))):
        try:
            route = request.app.router.get(request.path, method, None)[0]
        except SanicException:
            continue
        return bool(getattr(route.ctx, "admin_side", False))
    return False


async def _stop_with_the_supervisor(app: Sanic) -> None:
    """In a worker of several: stop gracefully once the supervisor is gone, even killed
    by SIGKILL (this process is then adopted by another). Orphaned workers would go on
    holding the port and the event log's lock, and a restarted `serve` would refuse that
    log."""
    supervisor = os.getppid()
    while os.getppid() == supervisor:
        await asyncio.sleep(SUPERVISOR_CHECK)
    log.warning("worker %d: the supervisor %d is gone: stopping", os.getpid(), supervisor)
    # Nobody is left to kill this process if its stop hangs: it would hold the port and
    # the log's lock for ever. A thread, not the event loop, ends it after the grace.
    deadline = threading.Timer(ORPHAN_STOP, _exit_orphan, (supervisor,))
    deadline.daemon = True  # a stop that ends in time is not held up by it
    deadline.start()
    app.stop(terminate=False)


def _exit_orphan(supervisor: int) -> None:
    log.error("worker %d: stopping took over %.0f s with the supervisor %d gone: exiting",
              os.getpid(), ORPHAN_STOP, supervisor)
    os._exit(1)


async def _promote(holder: list[Serving], follower: Follower) -> None:
    """Serve as the leader once this follower has taken over from a dead one."""

    def promote(leader: Serving) -> None:
        holder[0] = leader

    await take_over_when_leader_dies(follower, promote)


async def _reload(runtime: Serving) -> None:
    try:
        changes = await runtime.reload()
        log.info("configuration reloaded: %s", ", ".join(changes) or "no changes")
    except (cfg.ConfigError, DomainError) as exc:
        log.error("configuration not reloaded: %s", exc)


Handler = Callable[..., Awaitable[HTTPResponse]]


def _admin_routes(app: Blueprint, holder: list[Serving],
                  tokens: list[tuple[str, bytes]]) -> None:
    def authorised(op: str) -> Callable[[Handler], Handler]:
        """Check the bearer token on the headers; then read the body and run admin
        operation `op` with its fields (a client without the token never gets to send
        one: it may never finish)."""

        def decorate(handler: Handler) -> Handler:
            async def wrapper(request: Request, **path: Any) -> HTTPResponse:
                header = request.headers.get("authorization", "")
                scheme, _, offered = header.partition(" ")
                offered_bytes = offered.strip().encode("utf-8", "surrogateescape")
                actor = None
                if scheme.lower() == "bearer" and offered_bytes:
                    for name, secret in tokens:  # constant time for each token
                        if hmac.compare_digest(offered_bytes, secret):
                            actor = name
                if actor is None:
                    request.stream.refuse_body()
                    return respond({"error": "a valid admin bearer token is required"}, 401,
                                   {"WWW-Authenticate": "Bearer"})
                await http_server.receive_body(request)
                try:
                    args = {**handler(request), **path}
                except QueryError as exc:
                    return error(400, str(exc))
                status, body = await holder[0].admin(op, args, actor)
                return respond(body, status)

            wrapper.__name__ = f"admin_{op}"
            return wrapper

        return decorate

    def json_body(request: Request) -> dict[str, Any]:
        if not request.body:
            return {}
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise QueryError(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise QueryError("the body must be a JSON object")
        return body

    def no_body(request: Request) -> dict[str, Any]:
        return {}

    def query_numbers(request: Request) -> dict[str, Any]:
        try:
            return {name: int(request.args.get(name)) for name in ("after", "limit")
                    if name in request.args}
        except ValueError:
            raise QueryError("`after` and `limit` must be integers") from None

    def reason_in_query(request: Request) -> dict[str, Any]:
        body = json_body(request)
        if "reason" in request.args:
            body.setdefault("reason", request.args.get("reason"))
        return body

    app.add_route(authorised("nodes")(no_body), "/admin/nodes", methods=["GET"],
                  name="admin_nodes", stream=True, ctx_admin_side=True)
    app.add_route(authorised("add")(json_body), "/admin/nodes", methods=["POST"],
                  name="admin_add", stream=True, ctx_admin_side=True)
    app.add_route(authorised("update")(json_body), "/admin/nodes/<node_id>", methods=["PUT"],
                  name="admin_update", stream=True, ctx_admin_side=True)
    app.add_route(authorised("remove")(reason_in_query), "/admin/nodes/<node_id>",
                  methods=["DELETE"], name="admin_remove", stream=True, ctx_admin_side=True)
    app.add_route(authorised("events")(query_numbers), "/admin/events", methods=["GET"],
                  name="admin_events", stream=True, ctx_admin_side=True)
    app.add_route(authorised("reload")(no_body), "/admin/reload", methods=["POST"],
                  name="admin_reload", stream=True, ctx_admin_side=True)

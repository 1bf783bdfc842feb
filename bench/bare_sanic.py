"""A bare Sanic app returning a constant JSON body: the baseline for /get-tcp-ip.

Its route has the same path, so the load generator sends both the very same request and
the difference is what the dispatcher does, not Sanic's parsing of a longer URL.

    python -m bench.bare_sanic PORT WORKERS
"""

import functools
import sys

from sanic import Sanic
from sanic.response import HTTPResponse
from sanic.worker.loader import AppLoader

BODY = b'{"node":"n1","ip":"127.0.0.1","port":9001}'


def create_app() -> Sanic:
    app = Sanic("bare", configure_logging=False)

    @app.get("/get-tcp-ip")
    async def constant(request):
        return HTTPResponse(BODY, content_type="application/json")

    return app


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    options = {"host": "127.0.0.1", "port": port, "access_log": False, "motd": False}
    if workers == 1:  # one process, as `imdispatch serve` runs one worker
        app = create_app()
        app.prepare(**options, single_process=True)
        Sanic.serve_single(primary=app)
    else:
        loader = AppLoader(factory=functools.partial(create_app))
        app = loader.load()
        app.prepare(**options, workers=workers)
        Sanic.serve(primary=app, app_loader=loader)

"""Hostile input from every side, against real processes: fake nodes answering status
requests with nonsense, HTTP requests built to break things, a flood of connections."""

import asyncio
import http.client
import json
import resource
import socket
import string
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import nats
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imnode.client import ClientError, ImClient
from tests.imnode.helpers import running_node
from tests.test_dispatcher_e2e import FAST_OR_PLAIN, TOKEN, WEIGHTS, Cluster, shares

SECRET = TOKEN.split(":")[1]


def status(node_id, **changes):
    reply = {"node_id": node_id, "ip": "127.0.0.1", "port": 9000, "connections": 0,
             "capacity": 100, "accepting": True, "draining": False, "cpu": 0.1,
             "loop_lag_ms": 0.2, "uptime_s": 5.0, "version": "1.0.0", "ts": time.time()}
    return orjson.dumps({**reply, **changes})


FAKES = {  # node id -> (reply bytes, or None to answer too late; the cause expected)
    "wrongtypes": (status("wrongtypes", port="9000"), "bad_reply"),
    "negative": (status("negative", connections=-5), "bad_reply"),
    "hugenumber": (status("hugenumber").replace(b'"connections":0',
                                                b'"connections":' + b"9" * 40), "bad_reply"),
    "nan": (status("nan").replace(b'"cpu":0.1', b'"cpu":NaN'), "bad_reply"),
    "megabyte": (b'{"node_id":"megabyte","pad":"' + b"x" * 1_000_000 + b'"}', "bad_reply"),
    "garbage": (b"\xff\xfe<html>not json", "bad_reply"),
    "notanobject": (b"[1, 2, 3]", "bad_reply"),
    "imposter": (status("e2e1"), "identity_mismatch"),
    "slow": (None, "timeout"),
}


class FakeNodes(threading.Thread):
    """Plain nats-py responders for the fake node ids, on a loop of their own."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.ready, self.loop = url, threading.Event(), asyncio.new_event_loop()

    def run(self):
        self.loop.run_until_complete(self._serve())

    async def _serve(self):
        nc = await nats.connect(self.url)
        for node_id, (reply, _) in FAKES.items():
            async def answer(msg, reply=reply):
                if reply is None:
                    await asyncio.sleep(1.0)  # far past the poll timeout
                    reply = status("slow")
                await msg.respond(reply)

            await nc.subscribe(f"imnode.{node_id}.status", cb=answer)
        await nc.flush()
        self.ready.set()
        self.stopping = asyncio.Event()
        await self.stopping.wait()
        await nc.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.join(timeout=10)


def test_nodes_answering_nonsense_are_down_with_the_reason_and_others_unaffected(
        tmp_path, nats_server):
    fakes = FakeNodes(nats_server.url)
    fakes.start()
    assert fakes.ready.wait(10)
    running = Cluster(tmp_path, nats_server.url)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        for port, node_id in enumerate(FAKES, start=20000):
            assert running.admin("POST", "/admin/nodes", {"id": node_id, "ip": "127.0.0.2",
                                                          "port": port})[0] == 201

        def judged():
            nodes = {n["id"]: n for n in running.admin("GET", "/admin/nodes")[2]}
            return all(nodes[node]["health"] == "down" for node in FAKES) and nodes

        running.wait(judged, "every fake node is down", timeout=20)
        nodes = judged()
        for node_id, (_, cause) in FAKES.items():
            assert nodes[node_id]["health_cause"] == cause, (node_id, nodes[node_id])
            assert nodes[node_id]["health_detail"], node_id  # says what was wrong
        assert nodes["imposter"]["health_detail"] == "node 'imposter' was asked, 'e2e1' answered"
        assert all(nodes[node]["health"] == "up" for node in WEIGHTS)
        picks = shares(running, 60)
        assert set(picks) == set(WEIGHTS)  # clients only ever go to the real nodes
        assert running.get("/readyz")[0] == 200
    finally:
        running.stop()
        fakes.stop()


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "plain"])
def dispatcher(tmp_path_factory, request):
    """With the get-tcp-ip fast path and without (`[http] fast_path`)."""
    from tests.nats_server import NatsServer

    tmp = tmp_path_factory.mktemp("hostile")
    with NatsServer(tmp / "js") as server:
        running = Cluster(tmp, server.url, fast_path=request.param)
        try:
            running.wait(lambda: set(running.health().values()) == {"up"}, "nodes are up")
            yield running
        finally:
            running.stop()


def request(cluster, method, target, body=None, headers=None):
    """One raw HTTP request: (status, parsed JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=10)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None)
    finally:
        connection.close()


WEIRD = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=string.printable, max_size=300),
    st.sampled_from(["-1", "0", "6", "NaN", "inf", "1e9", "99999999999999999999", "1.5",
                     "' OR 1=1 --", "<script>", "../../etc/passwd", "%00", "e2e1,e2e1",
                     ",,,", "e2e1," * 70, "\u202e", "x" * 5000, ""]),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
)
NAMES = st.sampled_from(["uid", "exclude", "count", "uid", "count", "junk", "", "%", "count[]"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(NAMES, WEIRD), max_size=6))
def test_get_tcp_ip_answers_any_query_with_200_400_or_503(dispatcher, pairs):
    query = urllib.parse.urlencode(pairs)
    code, body = request(dispatcher, "GET", f"/get-tcp-ip?{query}")
    # the request line counts towards the 16 KiB header limit: past it, 413
    if len(query) > 16 * 1024:
        assert code == 413, (len(query), code, body)
    else:
        assert code in (200, 400, 503) or (code == 413 and len(query) > 15_000), (
            query[:200], code, body)
    if code == 200:
        assert set(body) <= {"node", "ip", "port", "backups"}  # nothing but addresses
        assert body["node"] in WEIGHTS
    else:
        assert isinstance(body["error"], str) and "Traceback" not in body["error"]


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(),
              st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=8,
)
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(["weight", "ip", "port", "draining", "reason", "id",
                                     "junk"]), JSON_VALUES, max_size=4)
    .map(lambda body: json.dumps(body).encode()),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["PUT /admin/nodes/e2e2", "PUT /admin/nodes/nosuch",
                        "POST /admin/nodes", "DELETE /admin/nodes/nosuch",
                        "GET /admin/events", "PUT /admin/nodes/../../x"]),
       BODIES, st.lists(st.tuples(st.sampled_from(["after", "limit", "reason"]), WEIRD),
                        max_size=3), st.booleans())
def test_admin_answers_any_body_with_a_clear_status(dispatcher, route, body, query, token):
    method, path = route.split(" ")
    headers = {"Authorization": f"Bearer {SECRET}"} if token else {}
    target = f"{path}?{urllib.parse.urlencode(query)}"
    code, answer = request(dispatcher, method, target, body=body, headers=headers)
    assert code in ((200, 201, 400, 404, 405, 409, 503) if token else (401, 404, 405)), (
        route, body, code, answer)
    if code >= 400:
        assert isinstance(answer["error"], str)
    if code == 200 and method == "PUT":  # keep the node usable for the others
        request(dispatcher, "PUT", "/admin/nodes/e2e2", json.dumps(
            {"weight": 2, "draining": False, "ip": "127.0.0.1",
             "port": dispatcher.node_ports["e2e2"]}).encode(), headers)


def test_oversized_requests_are_refused_by_limits(dispatcher):
    code, _ = request(dispatcher, "GET", "/get-tcp-ip", headers={"X-Big": "a" * 20_000})
    assert code in (413, 431, 400)
    code, answer = request(dispatcher, "POST", "/admin/nodes", body=b"{" + b" " * 70_000,
                           headers={"Authorization": f"Bearer {SECRET}"})
    assert code == 413 and "error" in answer
    code, _ = request(dispatcher, "GET", "/get-tcp-ip?uid=" + "u" * 10_000)
    assert code in (400, 414)
    assert request(dispatcher, "GET", "/get-tcp-ip")[0] == 200  # and it goes on serving


def test_idle_connections_do_not_stop_others_being_served(dispatcher):
    idle = []
    try:
        for _ in range(300):  # slowloris: connections that send half a request, then wait
            sock = socket.create_connection(("127.0.0.1", dispatcher.http_port), timeout=5)
            sock.sendall(b"GET /get-tcp-ip HTTP/1.1\r\nHost: x\r\n")
            idle.append(sock)
        started = time.monotonic()
        for _ in range(20):
            assert request(dispatcher, "GET", "/get-tcp-ip?uid=patient")[0] == 200
        assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()


def test_a_flood_of_connections_past_capacity_is_refused_not_queued():
    async def body():
        async with running_node("flooded", capacity=50) as node:
            clients = [ImClient(f"flood-{i}") for i in range(200)]
            results = await asyncio.gather(*(c.connect(node.address) for c in clients),
                                           return_exceptions=True)
            accepted = [r for r in results if r == "flooded"]
            refused = [r for r in results if isinstance(r, ClientError)]
            assert len(accepted) == 50 and len(refused) == 150
            assert {r.code for r in refused} == {"busy"}
            assert node.status()["connections"] == 50
            assert node.stats["refused_busy"] == 150
            await clients[0].send("flood-1", {"text": "still here"})  # the rest unaffected
            assert (await clients[1].receive(timeout=5))["body"] == {"text": "still here"}
            await asyncio.gather(*(c.close() for c in clients))

    asyncio.run(asyncio.wait_for(body(), 60))


@FAST_OR_PLAIN
def test_a_per_address_rate_limit_answers_429_with_retry_after(tmp_path, nats_server,
                                                               fast_path):
    running = Cluster(tmp_path, nats_server.url, http_extra="rate_limit_per_ip = 5\n",
                      fast_path=fast_path)
    try:
        running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")
        time.sleep(1.0)  # the waits above asked too
        answers = [running.get("/get-tcp-ip") for _ in range(12)]
        codes = [code for code, _, _ in answers]
        # five at once, then refused (one may slip through if the machine is slow enough
        # for an allowance to come back meanwhile: one every 0.2 s)
        assert codes[:5] == [200] * 5 and set(codes[5:]) <= {200, 429}, codes
        assert codes[5:].count(429) >= 5, codes
        _, headers, body = next(answer for answer in answers if answer[0] == 429)
        assert headers["Retry-After"] == "1" and body == {
            "error": "too many requests from this address", "retry_after": 1}
        assert running.get("/healthz")[0] == 200  # only get-tcp-ip is limited
        time.sleep(1.0)
        assert running.get("/get-tcp-ip")[0] == 200
    finally:
        running.stop()


def test_without_a_token_there_is_no_admin_api_at_all(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url, admin_token=None)
    try:
        for method, path in (("GET", "/admin/nodes"), ("POST", "/admin/nodes"),
                             ("PUT", "/admin/nodes/e2e1"), ("GET", "/admin/events"),
                             ("POST", "/admin/reload")):
            code, answer = request(running, method, path, body=b"{}",
                                   headers={"Authorization": "Bearer anything"})
            assert code == 404, (method, path, code, answer)
        assert request(running, "GET", "/readyz")[0] == 200
    finally:
        running.stop()



def raw(port, data, timeout=15):
    """Send `data` on a fresh connection; everything answered until the server closes
    (or `timeout` seconds pass: what came so far)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        return read_all(sock)
    finally:
        sock.close()


def read_all(sock, answer=b""):
    """What `sock` receives until the server closes it (a reset, if a byte of ours
    came after its close) or its timeout passes."""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return answer


def parsed(answer):
    """(status, headers, JSON body) of one raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in
               (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


@FAST_OR_PLAIN
def test_a_url_with_control_bytes_is_a_400_and_writes_no_log(tmp_path, nats_server,
                                                             fast_path):
    """It had no answer, and three chained tracebacks repeating the URL: 332 kB of log."""
    log = tmp_path / "dispatcher.log"
    running = Cluster(tmp_path, nats_server.url, log_file=log, fast_path=fast_path)
    try:
        before = log.stat().st_size
        for _ in range(50):
            answer = raw(running.http_port, b"GET /get-tcp-ip?uid=" + b"\x01" * 15_000
                         + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            code, headers, body = parsed(answer)
            assert code == 400 and headers["content-type"] == "application/json"
            assert "not valid" in body["error"] and "\x01" not in body["error"]
        assert raw(running.http_port, b"GET /get-tcp-ip?uid=a\x7fb HTTP/1.1\r\n\r\n")[:12] \
            == b"HTTP/1.1 400"
        written = log.read_bytes()[before:]
        assert written.count(b"\n") <= 1 and len(written) < 1000, written[:2000]
        assert running.get("/get-tcp-ip")[0] == 200
    finally:
        running.stop()


MALFORMED = {  # a head Sanic refuses -> what the 400 says
    b"GET /get-tcp-ip HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n": "malformed",  # folded
    b"POST /get-tcp-ip HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": "two Content-Length or Transfer-Encoding",
    b"GET /get-tcp-ip HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
    b"abcdef": "two Content-Length or Transfer-Encoding",
    b"GET /get-tcp-ip HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n": "Content-Length",
    b"GET /get-tcp-ip\r\n\r\n": "malformed",  # no HTTP version
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n": "malformed",
    b"\r\n\r\nGET /get-tcp-ip HTTP/1.1\r\nHost: x\r\n\r\n": "malformed",
    b"GET /get-tcp-ip?uid=a\x01b HTTP/1.1\r\nHost: x\r\n\r\n": "URL is not valid",
}


def test_a_malformed_head_is_a_400_that_says_what_was_wrong(dispatcher):
    """In Sanic 25 `BadURL is BadRequest`: every such 400 said the URL was not valid."""
    for data, says in MALFORMED.items():
        code, headers, body = parsed(raw(dispatcher.http_port, data, timeout=5))
        assert code == 400 and headers["connection"] == "close", (data, code)
        assert says in body["error"], (data, body)
        assert ("URL" in body["error"]) == (says == "URL is not valid"), (data, body)
        assert "get-tcp-ip" not in body["error"] and len(body["error"]) < 80, body
    assert request(dispatcher, "GET", "/get-tcp-ip")[0] == 200


HALF_A_BODY = b"Content-Length: 100\r\n\r\n{"


def test_a_request_that_never_finishes_arriving_is_timed_out(dispatcher):
    """Sanic timed out a silence, never a slow body: each of these held a connection and
    its buffers (8,000 of them: 43 -> 126 MB, none closed after 12 s)."""
    port, auth = dispatcher.http_port, f"Authorization: Bearer {SECRET}\r\n".encode()
    requests = [
        b"POST /admin/nodes HTTP/1.1\r\nHost: x\r\n" + auth + HALF_A_BODY,  # with the token
        b"GET /get-tcp-ip HTTP/1.1\r\nHost: x\r\n",  # the head never ends
    ]
    answers = [None] * (len(requests) + 1)
    closed = []

    def send(index, data):
        answers[index] = raw(port, data, timeout=15)  # REQUEST_TIMEOUT is 10 s

    def trickle():  # a byte every 2 s: never silent for long, never done
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        answer = b""
        try:
            for byte in b"GET /get-tcp-ip HTTP/1.1\r\nHost: x\r\n" + b"X" * 20:
                sock.sendall(bytes([byte]))
                sock.settimeout(2)
                try:
                    answer = sock.recv(65536)
                except TimeoutError:
                    continue
                answer = read_all(sock, answer)
                break
        finally:
            sock.close()
        answers[-1] = answer

    def silent():  # sends nothing: closed after 10 s, not kept 30 s as an idle keep-alive
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            try:
                closed.append(sock.recv(1) == b"")
            except TimeoutError:
                closed.append(False)

    threads = [threading.Thread(target=send, args=item) for item in enumerate(requests)]
    threads += [threading.Thread(target=trickle), threading.Thread(target=silent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert closed == [True]
    for answer in answers:
        code, headers, body = parsed(answer)
        assert code == 408 and headers["connection"] == "close", answer
        assert body == {"error": "the request did not arrive in time"}


def test_an_admin_request_without_the_token_is_refused_before_its_body(dispatcher):
    for request in (b"POST /admin/nodes HTTP/1.1\r\nHost: x\r\n" + HALF_A_BODY,
                    b"PUT /admin/nodes/e2e1 HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer wrong\r\n" + HALF_A_BODY,
                    b"POST /admin/nodes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                    b"\r\n\r\n5\r\n{"):
        code, headers, body = parsed(raw(dispatcher.http_port, request, timeout=3))
        assert code == 401 and headers["www-authenticate"] == "Bearer", (request, code)
        assert headers["connection"] == "close" and "token" in body["error"]
    # told to wait for "100 Continue", the client gets the 401 alone: no body is wanted
    answer = raw(dispatcher.http_port, b"POST /admin/nodes HTTP/1.1\r\nHost: x\r\n"
                 b"Expect: 100-continue\r\nContent-Length: 100\r\n\r\n", timeout=3)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    # a whole body that came with the headers is passed over; the connection is kept
    connection = http.client.HTTPConnection("127.0.0.1", dispatcher.http_port, timeout=5)
    try:
        for _ in range(2):
            connection.request("POST", "/admin/nodes", body=b'{"id": "x"}')
            response = connection.getresponse()
            assert response.status == 401 and json.loads(response.read())["error"]
    finally:
        connection.close()


def with_file_limit(tmp_path, nats_url, monkeypatch, limit, own_sockets, **options):
    """A Cluster whose dispatcher has `limit` open files (soft = hard), this process
    room for `own_sockets`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < own_sockets + 500:
        if hard != resource.RLIM_INFINITY and hard < own_sockets + 500:
            pytest.skip(f"needs {own_sockets + 500} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (own_sockets + 500, hard))
    popen = subprocess.Popen

    def limited(args, *rest, **options):  # the dispatcher only: its hard limit too
        if "dispatcher" in args:
            options["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                               (limit, limit))
        return popen(args, *rest, **options)

    monkeypatch.setattr(subprocess, "Popen", limited)
    try:
        running = Cluster(tmp_path, nats_url, **options)
    finally:
        monkeypatch.undo()
    assert resource.prlimit(running.dispatcher.pid, resource.RLIMIT_NOFILE) == (limit, limit)
    return running


@FAST_OR_PLAIN
def test_a_worker_past_its_file_limit_serves_new_clients(tmp_path, nats_server, monkeypatch,
                                                         fast_path):
    """1,100 connections against 1,024 open files: every new get-tcp-ip failed (the
    kernel refused the accept). Now the quietest connections are closed first."""
    running = with_file_limit(tmp_path, nats_server.url, monkeypatch, 1024, 1100,
                              fast_path=fast_path)
    slow = []
    try:
        request = (b"POST /admin/nodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                   + SECRET.encode() + b"\r\n" + HALF_A_BODY)
        for _ in range(1100):
            sock = socket.create_connection(("127.0.0.1", running.http_port), timeout=5)
            sock.sendall(request)
            slow.append(sock)
        answers = [request_status(running) for _ in range(20)]
        assert answers == [200] * 20, answers
        assert running.dispatcher.poll() is None
    finally:
        for sock in slow:
            sock.close()
        running.stop()


def established(port):
    """The server's ESTABLISHED TCP connections on loopback `port` (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "01")


def connect_and_send(port, data, receive_buffer=None):
    """A socket that sent `data` and will read nothing; None if the server refused it."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    try:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(data)
        return sock
    except OSError:
        sock.close()
        return None


@pytest.mark.parametrize(("workers", "fast_path"), [(1, True), (1, False), (2, True)],
                         ids=["1-fast", "1-plain", "2-fast"])
def test_clients_that_never_read_their_answers_are_evicted_at_the_file_limit(
        tmp_path, nats_server, monkeypatch, workers, fast_path):
    """Connections that pipeline /dashboard requests and never read the answers: those
    stuck writing were never evicted, the worker ran out of files and new get-tcp-ip
    clients were reset (1 of 30 answered). Heads that never end, evicted, each logged
    an AttributeError traceback."""
    log = tmp_path / "dispatcher.log"
    limit, heads, readers = 96, 25, 80  # a cap of 32 connections in each worker
    running = with_file_limit(tmp_path, nats_server.url, monkeypatch, limit,
                              (heads + readers) * workers, workers=workers, log_file=log,
                              fast_path=fast_path)
    port, held = running.http_port, []
    try:
        for _ in range(heads * workers):  # the quietest: heads that never end
            held.append(connect_and_send(port, b"GET /get-tcp-ip HTTP/1.1\r\nHost: x\r\n"))
        # 2.6 MB of answers each: past what the kernel buffers (2.1 MB here), the
        # worker's writes stall
        never_read = b"GET /dashboard HTTP/1.1\r\nHost: x\r\n\r\n" * 320
        for _ in range(readers * workers):
            held.append(connect_and_send(port, never_read, receive_buffer=2048))
        answers = [request_status(running) for _ in range(20)]
        assert answers == [200] * 20, answers
        with urllib.request.urlopen(running.url("/dashboard"), timeout=5) as page:
            assert page.status == 200  # it read a file for each request: 500s
        assert running.dispatcher.poll() is None
        assert established(port) <= 32 * workers  # each worker keeps to its cap
        # the rest: a head gets its 408 at 10 s (REQUEST_TIMEOUT); writes that took no
        # byte for as long are closed (kept for the 60 s response timeout before)
        running.wait(lambda: established(port) == 0, "every held connection is closed",
                     timeout=25)
    finally:
        for sock in held:
            if sock is not None:
                sock.close()
        running.stop()
    written = log.read_text()
    assert "Traceback" not in written and '"level":"error"' not in written, written[-3000:]


def request_status(running):
    try:
        return request(running, "GET", "/get-tcp-ip?uid=newcomer")[0]
    except OSError as exc:
        return type(exc).__name__

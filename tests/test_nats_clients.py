"""What NATS clients of the dispatcher see, against real processes: every worker answers
the `imdispatch` micro service (picks survive the leader worker's death), picks over NATS
are counted like get-tcp-ip's, a refusal says why and when to come back, and a clean stop
of either program says nothing about NATS while a real outage does."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from itertools import pairwise

import jsonschema
import nats
import pytest

from tests.imnode.test_micro import scatter
from tests.nats_server import NatsServer, free_port
from tests.schemas import schema
from tests.test_dispatcher_e2e import WEIGHTS, Cluster
from tests.test_observability import CHROMIUM, dump_dom, scraped, value


def all_up(running):
    running.wait(lambda: set(running.health().values()) == {"up"}, "every node is up")


def ask(url, body):
    """Run `body(nc)` with a client connected to `url`."""

    async def main():
        nc = await nats.connect(url)
        try:
            return await body(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


async def pick(nc, request=b"", timeout=2.0):
    """An `imdispatch.pick` reply: (error code or None, JSON body)."""
    msg = await nc.request("imdispatch.pick", request, timeout=timeout)
    code = (msg.headers or {}).get("Nats-Service-Error-Code")
    return (int(code) if code else None), json.loads(msg.data), msg.headers or {}


@pytest.fixture
def two_workers(tmp_path, nats_server):
    running = Cluster(tmp_path, nats_server.url, workers=2)
    try:
        all_up(running)
        yield running
    finally:
        running.stop()


def test_every_worker_is_an_instance_and_nats_picks_are_counted(two_workers):
    async def body(nc):
        replies = {verb: await scatter(nc, f"$SRV.{verb}.imdispatch")
                   for verb in ("PING", "INFO", "STATS")}
        answers = [await pick(nc, b'{"uid": "u1"}') for _ in range(40)]
        return replies, answers

    replies, answers = ask(two_workers.nats_url, body)
    for verb, found in replies.items():  # what `nats micro ls|info|stats` gathers
        assert len({reply["id"] for reply in found}) == 2, (verb, found)
        for reply in found:
            jsonschema.validate(reply, schema(verb.lower()))
    assert all(code is None and answer["node"] in WEIGHTS for code, answer, _ in answers)
    for _ in range(10):
        assert two_workers.get("/get-tcp-ip")[0] == 200
    samples = scraped(two_workers, lambda samples: sum(
        value(samples, "imdispatch_assignments_total", node=node, via="nats") or 0
        for node in WEIGHTS) == 40, "every worker's NATS picks are in")
    assert sum(value(samples, "imdispatch_assignments_total", node=node, via="http")
               for node in WEIGHTS) == 10
    served = ask(two_workers.nats_url, lambda nc: scatter(nc, "$SRV.STATS.imdispatch"))
    per_instance = [next(e["num_requests"] for e in reply["endpoints"] if e["name"] == "pick")
                    for reply in served]
    assert sum(per_instance) == 40 and len(per_instance) == 2  # each request answered once
    data = two_workers.get("/dashboard/data")[2]
    assert data["dispatcher"]["picks"] == {"http": 10, "nats": 40}
    assert sum(node["assigned_total"] for node in data["nodes"]) == 50
    assert sum(node["assigned_nats"] for node in data["nodes"]) == 40
    if CHROMIUM:  # and the page shows them
        assert "picks: 10 get-tcp-ip, 40 NATS" in dump_dom(two_workers)


def test_a_refusal_says_why_with_retry_after_over_http_and_nats(two_workers):
    everyone = ",".join(WEIGHTS)
    status, headers, body = two_workers.get(f"/get-tcp-ip?exclude={everyone}")
    assert status == 503 and body["error"] == "every node is excluded by the request"
    assert 2 <= body["retry_after"] <= 4 and headers["Retry-After"] == str(body["retry_after"])
    code, answer, nats_headers = ask(two_workers.nats_url, lambda nc: pick(
        nc, json.dumps({"exclude": list(WEIGHTS)}).encode()))
    assert code == 503 and answer["error"] == "every node is excluded by the request"
    assert 2 <= answer["retry_after"] <= 4
    assert nats_headers["Nats-Service-Error"] == answer["error"]
    code, answer, _ = ask(two_workers.nats_url, lambda nc: pick(nc, b'{"count": 9}'))
    assert code == 400 and "count" in answer["error"]
    two_workers.nodes["e2e3"].kill()  # the two left are both excluded
    two_workers.wait(lambda: two_workers.health()["e2e3"] == "down", "e2e3 is down")
    two_workers.wait(lambda: all(two_workers.get("/get-tcp-ip?exclude=e2e1,e2e2")[2].get(
        "error") == "every node that is up is excluded by the request" for _ in range(4)),
        "every worker says the request excluded the nodes that are up")
    for node in WEIGHTS:  # now the cluster really has no place
        assert two_workers.admin("PUT", f"/admin/nodes/{node}", {"draining": True})[0] == 200

    def refused_for_no_node():
        code, answer, _ = ask(two_workers.nats_url, lambda nc: pick(nc))
        return code == 503 and answer["error"] == "no IM node can take a client now" and (
            2 <= answer["retry_after"] <= 4)

    two_workers.wait(refused_for_no_node, "NATS picks are refused with a retry hint")
    def refusals(samples, via, reason):
        return value(samples, "imdispatch_pick_refusals_total", via=via, reason=reason) or 0

    # each worker writes its counts every second: wait for all of them, not the first
    samples = scraped(two_workers, lambda samples: refusals(samples, "http", "excluded") >= 5
                      and refusals(samples, "nats", "excluded") >= 1
                      and refusals(samples, "nats", "no_node") >= 1,
                      "every worker's refusals are in")
    assert refusals(samples, "nats", "excluded") == 1
    assert value(samples, "imdispatch_pick_refusals_total", via="http", reason="no_node") is None


def test_picks_over_nats_go_on_when_the_leader_worker_is_killed(two_workers, tmp_path):
    lock = tmp_path / "events" / "LOCK"
    leader = int(lock.read_text().split()[0])
    counts = {"ok": 0, "no_responders": 0, "timeout": 0, "refused": 0}
    answered = []  # when each answer came

    async def body(nc):
        async def picks_for(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    # 1 s: on a busy machine the worker taking over may hold its loop
                    # for a few hundred ms; only a request lost with the dead one times out
                    code, _, _ = await pick(nc, timeout=1.0)
                    counts["ok" if code is None else "refused"] += 1
                    answered.append(time.monotonic())
                except nats.errors.NoRespondersError:
                    counts["no_responders"] += 1
                    await asyncio.sleep(0.01)
                except nats.errors.TimeoutError:
                    counts["timeout"] += 1

        await picks_for(1.0)
        os.kill(leader, signal.SIGKILL)
        await picks_for(4.0)  # the takeover (about a second) and the new leader's link

    ask(two_workers.nats_url, body)
    gap = max(b - a for a, b in pairwise(answered))
    print(f"picks over NATS across the leader's SIGKILL: {counts}, longest gap {gap:.3f} s")
    assert counts["no_responders"] == 0, counts
    assert counts["timeout"] <= 1, counts  # at most the one the dead worker had taken
    assert counts["refused"] == 0 and counts["ok"] > 100, counts
    replies = ask(two_workers.nats_url, lambda nc: scatter(nc, "$SRV.PING.imdispatch"))
    assert 1 <= len(replies) <= 2  # the new leader's (and the replacement worker's)


# -- a clean stop is quiet, an outage is not ------------------------------------------------


def nats_warnings(path):
    """The JSON log's warnings and errors that speak of NATS."""
    found = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["level"] in ("warning", "error") and "NATS" in entry["message"]:
            found.append(entry["message"])
    return found


def wait_for(condition, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def start_imnode(url, log):
    with open(log, "ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "imnode", "serve", "--id", "q1", "--listen",
             f"127.0.0.1:{free_port()}", "--nats", url, "--capacity", "10",
             "--log-level", "info", "--log-format", "json", "--drain-timeout", "1",
             "--drain-window", "0.2"], stdout=subprocess.PIPE, stderr=stderr, text=True)
    wait_for(lambda: "NATS connected" in log.read_text(), "the imnode has NATS")
    return process


def test_an_imnode_stopped_cleanly_says_nothing_about_nats_but_an_outage_does(tmp_path):
    with NatsServer(tmp_path / "js") as server:
        clean = tmp_path / "clean.log"
        node = start_imnode(server.url, clean)
        node.terminate()
        assert node.wait(timeout=15) == 0
        assert "drained" in clean.read_text()  # it stopped the clean way
        assert nats_warnings(clean) == []
        outage = tmp_path / "outage.log"
        node = start_imnode(server.url, outage)
        try:
            server.stop()
            wait_for(lambda: any("disconnected" in w for w in nats_warnings(outage)),
                     "the imnode warns")
        finally:
            node.terminate()
            node.wait(timeout=15)


def test_a_dispatcher_stopped_cleanly_says_nothing_about_nats_but_an_outage_does(tmp_path):
    with NatsServer(tmp_path / "js") as server:
        clean = tmp_path / "clean.log"
        running = Cluster(tmp_path, server.url, workers=2, log_file=clean)
        try:
            all_up(running)
            wait_for(lambda: clean.read_text().count("NATS connected") == 2,
                     "both workers have NATS")
            running.dispatcher.terminate()
            assert running.dispatcher.wait(timeout=15) == 0
        finally:
            running.stop()
        assert nats_warnings(clean) == []
        outage = tmp_path / "outage.log"
        other = tmp_path / "other"
        other.mkdir()
        running = Cluster(other, server.url, workers=2, log_file=outage)
        try:
            all_up(running)
            server.stop()
            wait_for(lambda: sum("disconnected" in w for w in nats_warnings(outage)) == 2,
                     "both workers warn")
        finally:
            running.stop()

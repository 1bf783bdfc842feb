"""Newest login wins: real imnode processes and a real nats-server, with the faults that
once left one uid held by two nodes (a clock ahead, a node frozen past the broker's
patience), then the rule on its own (pure), under every order of notices."""

import asyncio
import heapq
import itertools
import os
import random
import signal
import time

import nats
import orjson
import pytest

from imnode import logins
from imnode.client import ImClient
from imnode.logins import BadNotice, LoginClock, Stamp, Verdict
from tests.imnode.helpers import imnode_process
from tests.nats_server import NatsServer


def run(body):
    return asyncio.run(asyncio.wait_for(body(), 60))


async def until(condition, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def status(nc, node_id):
    """The node's status, once it answers (it subscribed `im.login` before that)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return orjson.loads((await nc.request(f"imnode.{node_id}.status", b"",
                                                  timeout=0.5)).data)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            assert time.monotonic() < deadline, f"{node_id} does not answer"
            await asyncio.sleep(0.1)


def test_a_login_after_one_on_a_node_whose_clock_runs_ahead_still_wins(nats_server, tmp_path):
    """q2's clock runs 30 s ahead. carol logs in there, q1 reads the notice, then carol
    logs in again on q1: the later login must outrank the notice q1 has read, or q1
    keeps its copy (the notice came before it had one) and so does q2 (its stamp is
    larger): held by two nodes."""
    (tmp_path / "sitecustomize.py").write_text(
        "import time\n_wall = time.time\ntime.time = lambda: _wall() + 30\n")
    ahead = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    with imnode_process("q1", nats_server.url) as (_, q1), \
            imnode_process("q2", nats_server.url, env=ahead) as (_, q2):

        async def body():
            nc = await nats.connect(nats_server.url)
            assert (await status(nc, "q2"))["ts"] - time.time() > 25  # it runs ahead
            await status(nc, "q1")
            probe_q1, probe_q2 = ImClient("ahead-probe"), ImClient("ahead-probe")
            await probe_q1.connect(q1)
            carol_q2, carol_q1 = ImClient("ahead-carol"), ImClient("ahead-carol")
            await carol_q2.connect(q2)
            await probe_q2.connect(q2)
            # q2 announces carol, then the probe, on one connection, so q1 reads them in
            # that order: once it has replaced its probe, it has read carol's notice
            await until(lambda: probe_q1.goaways, "q1 to read q2's notices")
            await carol_q1.connect(q1)
            await until(lambda: carol_q2.goaways, "the older copy, on q2, to be replaced")
            assert carol_q2.goaways[0]["reason"] == "replaced" and not carol_q1.goaways
            assert (await status(nc, "q2"))["sessions"] == 1  # the probe only
            await nc.close()

        run(body)


def test_a_node_that_missed_a_newer_login_is_answered_when_it_comes_back(tmp_path):
    """p2 freezes (SIGSTOP) until the broker drops it as stale; carol logs in again on p1
    meanwhile, so p2 never reads that notice. Back, p2 announces its older copy: p1 must
    answer with the newer one, or p2 keeps its copy for good."""
    config = tmp_path / "nats.conf"
    config.write_text('ping_interval: "1s"\nping_max: 1\n')  # stale after about 2 s
    with NatsServer(tmp_path / "js", args=("-c", str(config))) as server, \
            imnode_process("p1", server.url) as (_, p1), \
            imnode_process("p2", server.url) as (frozen, p2):

        async def body():
            nc = await nats.connect(server.url)
            await status(nc, "p1")
            await status(nc, "p2")
            older, newer = ImClient("frozen-carol"), ImClient("frozen-carol")
            await older.connect(p2)
            frozen.send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + 20
            while True:  # until the broker has dropped p2: nothing reaches it any more
                try:
                    await nc.request("imnode.p2.status", b"", timeout=0.5)
                except nats.errors.NoRespondersError:
                    break
                except nats.errors.TimeoutError:
                    pass
                assert time.monotonic() < deadline, "the broker kept the frozen node"
                await asyncio.sleep(0.1)
            await newer.connect(p1)  # its notice cannot reach p2
            frozen.send_signal(signal.SIGCONT)
            await until(lambda: older.goaways, "the older copy, on p2, to be replaced")
            assert older.goaways[0]["reason"] == "replaced" and not newer.goaways
            assert (await status(nc, "p2"))["sessions"] == 0
            await nc.close()

        run(body)


# -- the rule, pure ----------------------------------------------------------------------

def test_stamps_only_move_forward_whatever_the_wall_clock_does():
    walls = iter([100.0, 100.0, 99.0, 101.0])
    clock = LoginClock(wall=lambda: next(walls))
    stamps = [clock.stamp("n1") for _ in range(4)]
    assert stamps == sorted(stamps) and len(set(stamps)) == 4
    assert stamps[-1] == Stamp(101.0, "n1")  # back on the wall clock once it has caught up


def test_a_login_outranks_every_notice_its_node_has_read():
    clock = LoginClock(wall=lambda: 100.0)
    ahead = Stamp(130.0, "n9")  # a node whose clock runs 30 s ahead
    clock.observe(ahead)
    ours = clock.stamp("n1")
    assert ours > ahead and logins.judge(ours, ahead) is Verdict.ANSWER
    assert logins.judge(ahead, ours) is Verdict.YIELD  # n9 decides the same


def test_the_same_time_on_two_nodes_goes_to_the_larger_id():
    a, b = Stamp(5.0, "n1"), Stamp(5.0, "n2")
    assert (logins.judge(a, b), logins.judge(b, a)) == (Verdict.YIELD, Verdict.ANSWER)


def test_notices_round_trip_exactly():
    stamp = LoginClock().stamp("n1")
    assert logins.decode_notice(logins.encode_notice("carol", stamp)) == ("carol", stamp)
    old_form = orjson.dumps({"uid": "carol", "node": "n2", "at": 17})  # an int time
    assert logins.decode_notice(old_form) == ("carol", Stamp(17.0, "n2"))


@pytest.mark.parametrize("data", [
    b"not json", b"[]", b"{}", b'{"uid": "c", "node": "n1"}',
    b'{"uid": "c", "node": "n1", "at": "soon"}', b'{"uid": "c", "node": "n1", "at": true}',
    b'{"uid": "c", "node": "n1", "at": 1e999}', b'{"uid": "c", "node": "", "at": 1}',
    b'{"uid": "c", "node": 7, "at": 1}', b'{"uid": "a.b", "node": "n1", "at": 1}',
    b'{"uid": null, "node": "n1", "at": 1}',
])
def test_malformed_notices_are_refused_by_type(data):
    with pytest.raises(BadNotice):
        logins.decode_notice(data)


def simulate(seed):
    """Logins of one uid on four nodes with skewed clocks; notices cross with random
    delays; each node is away from NATS for a while (it hears nothing and publishes
    nothing, then announces its copy again). Returns the logins and who holds what."""
    rng = random.Random(seed)
    nodes = [f"n{i}" for i in range(4)]
    now = [0.0]
    skews = {n: rng.uniform(-30, 30) for n in nodes}
    clocks = {n: LoginClock(wall=lambda n=n: 1000 + now[0] + skews[n]) for n in nodes}
    away = {}
    for n in nodes:
        start = rng.uniform(0, 3)
        away[n] = (start, start + rng.uniform(0, 2))
    held, stamped = {}, []
    events, order = [], itertools.count()

    def schedule(at, *event):
        heapq.heappush(events, (at, next(order), *event))

    def is_away(node):
        return away[node][0] <= now[0] < away[node][1]

    def publish(node, stamp):
        if not is_away(node):
            for other in nodes:
                schedule(now[0] + rng.expovariate(10), "notice", other, stamp)

    for _ in range(rng.randint(2, 6)):
        schedule(rng.uniform(0, 3), "login", rng.choice(nodes), None)
    for n in nodes:
        schedule(away[n][1], "back", n, None)
    while events:
        now[0], _, kind, node, stamp = heapq.heappop(events)
        if kind == "login":
            held[node] = clocks[node].stamp(node)
            stamped.append(held[node])
            publish(node, held[node])
        elif kind == "back" and node in held:
            publish(node, held[node])
        elif kind == "notice" and stamp.node != node and not is_away(node):
            clocks[node].observe(stamp)
            if node in held:
                if logins.judge(held[node], stamp) is Verdict.YIELD:
                    del held[node]
                else:
                    publish(node, held[node])
    return stamped, held


def test_every_order_of_notices_leaves_exactly_the_newest_login():
    for seed in range(500):
        stamped, held = simulate(seed)
        assert list(held.values()) == [max(stamped)], f"seed {seed}"

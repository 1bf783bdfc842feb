"""Newest login wins: the rule on its own (pure), then real nodes and crafted notices on
a real nats-server forcing the interleavings that once left one uid held by two nodes."""

import asyncio
import heapq
import itertools
import random
import time

import nats
import orjson
import pytest

from imnode import logins
from imnode.client import ImClient
from imnode.logins import BadNotice, LoginClock, Stamp, Verdict
from imnode.server import LOGIN_SUBJECT
from tests.imnode.helpers import running_node
from tests.imnode.test_cluster import cluster


def run(body):
    return asyncio.run(asyncio.wait_for(body(), 60))


async def until(condition, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_login_after_a_notice_from_a_clock_ahead_still_wins(nats_server):
    """A node whose clock runs 30 s ahead announces a login; the user then logs in on
    another node. The later login must outrank the notice it has already seen, or the
    node ahead keeps its (older) copy and so does this one: held by two nodes."""

    async def body():
        async with cluster(nats_server.url, "k1") as (n1,):
            nc = await nats.connect(nats_server.url)
            notices = await nc.subscribe(LOGIN_SUBJECT)
            await nc.flush()
            probe = ImClient("skew-probe")
            await probe.connect(n1.address)
            ahead = {"uid": "skew-carol", "node": "k9", "at": time.time() + 30}
            await nc.publish(LOGIN_SUBJECT, orjson.dumps(ahead))
            # From one publisher, notices arrive in order: once k1 has acted on this one
            # (it replaces the probe), it has read the notice from the clock ahead.
            await nc.publish(LOGIN_SUBJECT, orjson.dumps(
                {"uid": "skew-probe", "node": "k9", "at": time.time() + 31}))
            await until(lambda: probe.goaways, "k1 to read the crafted notices")
            carol = ImClient("skew-carol")
            await carol.connect(n1.address)
            while True:
                notice = orjson.loads((await notices.next_msg(timeout=10)).data)
                if (notice["uid"], notice["node"]) == ("skew-carol", "k1"):
                    break
            # k9, applying the rule to k1's notice, must find its own copy the older one
            assert (ahead["at"], ahead["node"]) < (notice["at"], notice["node"])
            assert "skew-carol" in n1.sessions and not carol.goaways
            await carol.close()
            await nc.close()

    run(body)


def test_an_older_copy_that_reappears_is_closed_by_the_newer_one(nats_server):
    """The older login sits on a node that was away from NATS when the newer login's
    notice went out; when it comes back and announces its copy, the node with the
    newer one must answer, or the older copy is never told."""

    async def body():
        async with cluster(nats_server.url, "m1") as (n1,), running_node("m2") as n2:
            older, newer = ImClient("back-carol"), ImClient("back-carol")
            await older.connect(n2.address)  # m2 has no NATS yet: nobody hears of it
            await newer.connect(n1.address)  # its notice goes out while m2 cannot hear
            nc = await nats.connect(nats_server.url)
            await n2.attach(nc)  # m2 announces its (older) copy
            await until(lambda: older.goaways, "the older copy to be replaced")
            assert older.goaways[0]["reason"] == "replaced"
            assert "back-carol" in n1.sessions and "back-carol" not in n2.sessions
            assert not newer.goaways
            await newer.close()
            await n2.stop()
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

"""Slow start ramps, the assignment rate, pending picks and panic mode (the cap itself is
counted by the selection core: tests/core/test_ledger.py)."""

import asyncio
import tempfile

from dispatcher import config as cfg
from dispatcher import pacing
from dispatcher.domain import decisions
from dispatcher.domain.state import NodeRecord
from dispatcher.eventlog.filelog import FileLog
from dispatcher.journal import Journal
from dispatcher.serving import Serving


def record(health="up", since=100.0, capacity=None):
    node = NodeRecord("n1", "10.0.0.1", 9000, 5, health=health, health_since=since)
    node.capacity = capacity
    return node


def test_slow_start_ramps_linearly_from_five_percent():
    up = record(since=100.0)
    assert pacing.slow_start_ramp(up, 100.0, 30) == 50
    assert pacing.slow_start_ramp(up, 115.0, 30) == 500
    assert pacing.slow_start_ramp(up, 130.0, 30) == 1000
    assert pacing.slow_start_ramp(up, 1000.0, 30) == 1000
    assert pacing.slow_start_ramp(up, 100.5, 0) == 1000  # slow_start = 0: off
    assert pacing.slow_start_ramp(record(health="down"), 100.5, 30) == 1000


def test_assign_rate_defaults_to_a_tenth_of_capacity():
    assert pacing.assign_rate(record(capacity=5000), 0) == 500
    assert pacing.assign_rate(record(capacity=5), 0) == 1.0
    assert pacing.assign_rate(record(capacity=5000), 42) == 42
    assert pacing.assign_rate(record(), 0) is None  # capacity unknown: no cap


def test_address_limit_allows_a_seconds_worth_then_says_when():
    limit = pacing.AddressLimit(4.0)  # one every 0.25 s, four at once
    assert [limit.allow("10.0.0.1", 0.0) for _ in range(4)] == [0.0] * 4
    assert limit.allow("10.0.0.1", 0.0) == 0.25  # the fifth: in a quarter of a second
    assert limit.allow("10.0.0.2", 0.0) == 0.0  # another address has its own allowance
    assert limit.allow("10.0.0.1", 0.25) == 0.0
    limit.FORGET_AT = 2
    limit.allow("10.0.0.3", 100.0)  # everyone is back to full by now: forgotten
    assert set(limit._due) == {"10.0.0.3"}


def test_address_limit_stays_fast_when_every_address_is_fresh():
    limit = pacing.AddressLimit(4.0)
    limit.FORGET_AT = 100
    for i in range(20_000):  # a storm from 20,000 addresses within 0.2 s: none expires
        assert limit.allow(f"10.1.{i // 256}.{i % 256}", i * 1e-5) == 0.0
    assert limit._swept_at < 0.01  # one sweep at the threshold, not one per request
    limit.allow("10.9.9.9", 10.0)  # a period later: the sweep empties it
    assert len(limit._due) == 1


class Worker(Serving):
    """A serving worker on a journal of the test's own (no NATS, no HTTP)."""

    def __init__(self, journal, config):
        super().__init__(config)
        self.journal = journal

    @property
    def state(self):
        return self.journal.state


def test_each_poll_clears_pending_picks_even_without_a_load_event(tmp_path):
    async def run():
        journal = Journal(FileLog(tmp_path))
        await journal.open()
        config = cfg.parse("[balance]\nassign_rate = 1000\n")  # the cap is not under test
        worker, state = Worker(journal, config), journal.state
        await journal.record(decisions.add_node(state, "a", "10.0.0.1", 9000, 1, actor="t"))
        await journal.record(decisions.mark_up(state, "a"))
        await journal.record(decisions.observe_load(state, "a", 0, 100))
        for _ in range(85):
            assert state.selector.pick() == "a"
        assert decisions.observe_load(state, "a", 0, 100) == []  # nothing moved: no event
        assert state.selector.node("a")["pending"] == 85
        worker.poll_happened()  # the poll cycle that saw it still empty
        assert state.selector.node("a")["pending"] == 0
        assert sum(state.selector.pick() == "a" for _ in range(85)) == 85  # not "full"
        await journal.close()

    asyncio.run(run())


def test_panic_mode_doubts_uncertain_failures_only():
    async def run(tmp):
        config = cfg.parse("[balance]\npanic_threshold = 0.5\n")
        journal = Journal(FileLog(tmp))
        await journal.open()
        worker, state = Worker(journal, config), journal.state
        for node in ("a", "b", "c", "d"):
            await journal.record(decisions.add_node(state, node, "10.0.0.1", 9000, 1,
                                                    actor="t"))
            await journal.record(decisions.mark_up(state, node))
        await journal.record(decisions.mark_down(state, "a", "timeout", "slow"))
        worker.update_panic()
        assert not worker.panic and state.selector.node("a")["up"] is False
        await journal.record(decisions.add_node(state, "e", "10.0.0.1", 9000, 1, actor="t"))
        await journal.record(decisions.mark_down(state, "e", "timeout", "never answered"))
        await journal.record(decisions.mark_down(state, "b", "timeout", "slow"))
        await journal.record(decisions.mark_down(state, "c", "no_responders", "gone"))
        worker.update_panic()  # 1 of 4 up: below half
        assert worker.panic
        picked = {state.selector.pick() for _ in range(12)}
        assert picked == {"a", "b", "d"}  # c's process is gone, e was never up: not doubted
        await journal.record(decisions.mark_up(state, "c"))
        await journal.record(decisions.mark_up(state, "a"))
        worker.update_panic()  # 3 of 4 up: normal again
        assert not worker.panic and state.selector.node("b")["up"] is False
        await journal.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(tmp))

"""`imdispatch audit`'s table fits a 120-column terminal, even with a `config_reloaded`
event (a whole configuration in one cell) in the log, one line an event whatever a reason
holds; `--json` keeps every byte."""

import asyncio

import orjson

from dispatcher import config as cfg
from dispatcher.domain import decisions
from dispatcher.eventlog.filelog import FileLog
from dispatcher.journal import Journal
from tests.test_cli_log import imdispatch

CONFIG = """
[http]
port = 8080
[nats]
servers = ["nats://127.0.0.1:4222"]
[eventlog]
path = "/var/lib/imdispatch/events"
""" + "".join(f'[[nodes]]\nid = "node-{i}"\nip = "10.0.0.{i}"\nport = 9001\nweight = {i}\n'
              for i in range(1, 6))


def test_the_audit_table_fits_120_columns_and_json_keeps_everything(tmp_path):
    path = tmp_path / "events"

    async def build():
        journal = Journal(FileLog(path, fsync="always"))
        await journal.open()
        state = journal.state
        await journal.record(decisions.reconcile_config(
            state, cfg.parse(CONFIG, "dispatcher.toml").recorded(), "dispatcher.toml"))
        await journal.record(decisions.mark_up(state, "node-1"))
        await journal.record(decisions.set_draining(state, "node-2", True, actor="admin:ops",
                                                    reason="kernel upgrade " + "x" * 300))
        await journal.record(decisions.set_draining(state, "node-3", True, actor="admin:ops",
                                                    reason="one\ntwo \x1b[2Jgone"))
        await journal.close()

    asyncio.run(build())
    table = imdispatch("audit", "--log", path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "TYPE", "NODE", "ACTOR", "DETAILS", "REASON"]
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    reloaded = next(line for line in lines if "config_reloaded" in line)
    assert "source=dispatcher" in reloaded and "... " in reloaded
    assert any("node_up" in line and "node-1" in line for line in lines)
    assert any("kernel upgrade" in line and line.endswith("...") for line in lines)
    assert "--json shows them whole" in table.stderr
    assert len(lines) == 1 + 9 and "\x1b" not in table.stdout  # one line an event
    assert any("one\\x0atwo \\x1b[2Jgone" in line for line in lines)
    whole = orjson.loads(imdispatch("audit", "--log", path, "--json").stdout)
    config = next(event for event in whole if event["type"] == "config_reloaded")["config"]
    assert [node["id"] for node in config["nodes"]] == [f"node-{i}" for i in range(1, 6)]
    assert any((event["reason"] or "").endswith("x" * 300) for event in whole)

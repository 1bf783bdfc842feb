"""`imdispatch replay | audit | verify --nats URL --stream NAME`: a JetStream history read
as the file log is, against a real nats-server."""

import asyncio

import orjson
import pytest

from dispatcher.eventlog.filelog import FileLog
from dispatcher.eventlog.jetstream import JetStreamLog
from dispatcher.eventlog.snapshots import SnapshotStore
from tests.eventlog.helpers import stamped_events
from tests.eventlog.test_jetstream import publish_raw, record_headers
from tests.nats_server import NatsServer, free_port, run_with_client
from tests.test_cli_log import imdispatch, json_views, record_day

STREAM = "CLI_HISTORY"
SUBJECT = "imdtest.cli.history"  # not the default: readers take the stream's own subject


def one_line_error(result, *wanted):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    for text in wanted:
        assert text in result.stderr


@pytest.fixture(scope="module")
def history(nats_server, tmp_path_factory):
    """The same day recorded on a file log and on a stream: (file log path, stream
    arguments, node views at seq 6, final node views)."""
    path = tmp_path_factory.mktemp("cli-js") / "log"
    on_file = asyncio.run(record_day(FileLog(path), SnapshotStore(path / "snapshots")))
    on_stream = run_with_client(
        nats_server.url, lambda nc: record_day(JetStreamLog(nc, stream=STREAM, subject=SUBJECT)))
    assert json_views(on_stream) == json_views(on_file)  # what the live journals held
    return path, ("--nats", nats_server.url, "--stream", STREAM), *on_file


def test_replay_of_a_stream_is_the_replay_of_the_file_log(history):
    path, stream, at_six, final = history
    from_stream = imdispatch("replay", *stream, "--json")
    assert from_stream.returncode == 0, from_stream.stderr
    assert orjson.loads(from_stream.stdout) == json_views(final)
    assert from_stream.stdout == imdispatch("replay", "--log", path, "--json").stdout
    until = imdispatch("replay", *stream, "--until", 6, "--json")
    assert until.returncode == 0, until.stderr
    assert orjson.loads(until.stdout) == json_views(at_six)
    assert until.stdout == imdispatch("replay", "--log", path, "--until", 6, "--json").stdout
    table = imdispatch("replay", *stream)
    assert table.stdout.splitlines()[0].startswith("state at seq 13 ")
    assert table.stdout == imdispatch("replay", "--log", path).stdout


def test_audit_of_a_stream_lists_the_same_events(history):
    path, stream, _, _ = history
    everything = imdispatch("audit", *stream, "--json")
    assert everything.returncode == 0, everything.stderr
    events = orjson.loads(everything.stdout)
    assert [e["seq"] for e in events] == list(range(1, 14))
    assert everything.stdout == imdispatch("audit", "--log", path, "--json").stdout
    drained = imdispatch("audit", *stream, "--node", "n2", "--type", "node_drained", "--json")
    (event,) = orjson.loads(drained.stdout)
    assert (event["seq"], event["actor"], event["reason"]) == (8, "admin:ops", "kernel upgrade")
    table = imdispatch("audit", *stream, "--node", "n1")
    assert table.stdout == imdispatch("audit", "--log", path, "--node", "n1").stdout
    assert "connections=950" in table.stdout


def test_verify_passes_on_a_stream_with_the_file_logs_hash_chain(history):
    path, stream, _, _ = history
    result = imdispatch("verify", *stream)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"stream {STREAM} on {stream[1]}: 13 records, seq 1..13, ")
    assert "ok: every record's format, sequence number and hash link" in result.stdout
    on_file = imdispatch("verify", "--log", path).stdout.splitlines()[0]
    head = first.rsplit("head hash ", 1)[1]
    assert on_file.endswith(f"head hash {head}")  # the same records, the same chain


def test_a_forged_record_on_a_stream_is_named(nats_server):
    where = {"stream": "CLI_FORGED", "subject": "imdtest.cli.forged"}

    async def forge(nc):
        await record_day(JetStreamLog(nc, **where))
        forged = stamped_events(14)[-1]  # seq 14, appended with a made-up previous hash
        await publish_raw(nc, where, orjson.dumps(forged), record_headers(b"\x01" * 32))

    run_with_client(nats_server.url, forge)
    stream = ("--nats", nats_server.url, "--stream", where["stream"])
    for command in ("verify", "replay", "audit"):
        result = imdispatch(command, *stream)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "hash chain breaks at seq 14" in result.stderr, result.stderr


def test_a_missing_stream_and_an_unreachable_server_are_one_line_errors(nats_server):
    for command in ("replay", "audit", "verify"):
        one_line_error(imdispatch(command, "--nats", nats_server.url, "--stream", "NO_SUCH"),
                       f"imdispatch {command}: no event log stream NO_SUCH on {nats_server.url}")
    nobody = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    one_line_error(imdispatch("verify", "--nats", nobody, "--stream", STREAM, timeout=30),
                   f"cannot connect to NATS at {nobody}: ")


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        ((), "give --log PATH (a file log) or --nats URL --stream NAME"),
        (("--nats", "nats://127.0.0.1:4222"), "give --log PATH"),
        (("--stream", "S"), "give --log PATH"),
        (("--log", "L", "--nats", "nats://127.0.0.1:4222", "--stream", "S"),
         "--log reads a file log, --nats --stream a stream: give one of them"),
        (("--log", "L", "--nats-user", "u"), "--log reads a file log, --nats-user a stream"),
        (("--nats", "nats://127.0.0.1:4222", "--stream", "S", "--nats-creds", "/no/such"),
         "--nats-creds: no such file: /no/such"),
    ],
)
def test_log_or_stream_one_of_them(args, wanted):
    for command in ("replay", "audit", "verify"):
        one_line_error(imdispatch(command, *args), f"imdispatch {command}: {wanted}")


def test_credentials_are_those_of_the_nats_table(tmp_path):
    """User and password (from the environment, never argv) reach the server: right ones
    read the stream, wrong or none are refused in one line."""
    config = tmp_path / "auth.conf"
    config.write_text("authorization { user: reader, password: s3cret }\n")
    with NatsServer(tmp_path / "auth", args=("-c", str(config))) as server:
        where = {"stream": "CLI_AUTH", "subject": "imdtest.cli.auth"}
        run_with_client(server.url, lambda nc: record_day(JetStreamLog(nc, **where)),
                        user="reader", password="s3cret")
        stream = ("verify", "--nats", server.url, "--stream", where["stream"])
        right = imdispatch(*stream, "--nats-user", "reader",
                           env={"IMDISPATCH_NATS_PASSWORD": "s3cret"})
        assert right.returncode == 0 and "13 records" in right.stdout, right.stderr
        for extra, env in (((), {}), (("--nats-user", "reader"),
                                      {"IMDISPATCH_NATS_PASSWORD": "wrong"})):
            refused = imdispatch(*stream, *extra, env=env)
            one_line_error(refused, "cannot connect to NATS",
                           "refused the credentials (Authorization Violation)")
            assert "wrong" not in refused.stderr


def test_a_stream_whose_first_record_does_not_start_the_chain_is_named(nats_server):
    where = {"stream": "CLI_UNCHAINED", "subject": "imdtest.cli.unchained"}

    async def forge(nc):
        await nc.jetstream().add_stream(name=where["stream"], subjects=[where["subject"]])
        first = stamped_events(1)[0]
        await publish_raw(nc, where, orjson.dumps(first), record_headers(b"\x02" * 32))

    run_with_client(nats_server.url, forge)
    for command in ("verify", "replay"):
        result = imdispatch(command, "--nats", nats_server.url, "--stream", where["stream"])
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "record 1 does not link to the start of the log" in result.stderr


def test_a_record_that_is_not_json_is_named_by_every_command(nats_server):
    """A message with a record's headers, chained right, whose payload is not JSON: each
    command names it in one line, exit 1 (`replay` was a JSONDecodeError traceback)."""
    where = {"stream": "CLI_NOT_JSON", "subject": "imdtest.cli.notjson"}

    async def forge(nc):
        log = JetStreamLog(nc, **where)
        await record_day(log)
        await publish_raw(nc, where, b"not json", record_headers(log.last_hash))
        return log.last_seq + 1

    bad = run_with_client(nats_server.url, forge)
    for command in ("replay", "verify", "audit"):
        result = imdispatch(command, "--nats", nats_server.url, "--stream", where["stream"])
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert f"record {bad} is not a JSON event" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr

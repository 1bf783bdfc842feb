"""The benchmark report: its Markdown and plots from a run's figures (no benchmark run)."""

import importlib.util

import pytest

from bench import report

MEASURED = {
    "core": [{"case": "pick, 8 nodes", "compiled_ns": 57.2, "reference_ns": 1673.0,
              "ratio": 29.25}],
    "figures": [{"name": "storm: all re-dispatched after", "value": 8.3, "unit": "s"},
                {"name": "HTTP keep-alive, 1 worker: bare Sanic: requests/s",
                 "value": 20000.0, "unit": "req/s"}],
    "targets": [{"target": "pick <= 100 ns", "value": 57.2, "unit": "ns", "met": True},
                {"target": "ratio >= 0.9", "value": 0.82, "unit": "x", "met": False},
                {"target": "imnode 10k", "value": None, "unit": "", "met": None}],
    "skipped": [{"benchmark": "bench/test_dispatcher.py::test_http[1]",
                 "reason": "wrk not installed: apt-get install wrk"}],
    "series": {
        "storm: assignments per node": {"bucket_s": 0.25, "weights": {"s1": 3, "s2": 1},
                                        "per_node": {"s1": [0, 30, 15], "s2": [0, 10, 5]},
                                        "refusals": [0.1]},
        "latency percentiles, keep-alive, 1 worker": {
            "get-tcp-ip, fast path": [[50, 0.4], [99, 1.0]], "bare Sanic": [[50, 1.0], [99, 3.5]]},
        "http: keep-alive, 1 worker": {
            "wrk": "wrk -t1 -c64 -d2s -s bench/wrk_percentiles.lua URL, 3 interleaved rounds",
            "servers": {
                "get-tcp-ip, fast path": {"rate": 80000.0, "p99_ms": 1.0, "non_2xx": 0,
                                          "errors": 0, "rates": [79000.0, 80000.0]},
                "get-tcp-ip, plain route": {"rate": 18000.0, "p99_ms": 9.5, "non_2xx": 0,
                                            "errors": 0, "rates": [18000.0]},
                "bare Sanic": {"rate": 20000.0, "p99_ms": 3.5, "non_2xx": 0, "errors": 0,
                               "rates": [20000.0]},
                "nginx": {"rate": 160000.0, "p99_ms": 0.5, "non_2xx": 0, "errors": 0,
                          "rates": [160000.0]}}},
        "http: Connection: close, 1 worker": {
            "wrk": "wrk -t1 -c64 -d2s -H 'Connection: close' URL",
            "servers": {
                "get-tcp-ip, fast path": {"rate": 12000.0, "p99_ms": 8.0, "non_2xx": 0,
                                          "errors": 0, "rates": [12000.0]},
                "get-tcp-ip, plain route": {"rate": 7500.0, "p99_ms": 30.0, "non_2xx": 0,
                                            "errors": 0, "rates": [7500.0]},
                "bare Sanic": {"rate": 8000.0, "p99_ms": 14.0, "non_2xx": 0, "errors": 0,
                               "rates": [8000.0]}}},
    },
}


def full_report():
    return {"machine": report.machine(), "versions": {"sanic": "25"}, "started": 0.0,
            "duration_s": 61.0, "pytest_exit_status": 1, "command": "make bench",
            **MEASURED}


def test_markdown_says_what_was_met_missed_and_skipped():
    text = report.markdown(full_report(), ["storm-assignments.png"])
    assert "| pick <= 100 ns | 57.20 ns | met |" in text
    assert "| ratio >= 0.9 | 0.82 x | **MISSED** |" in text
    assert "| imnode 10k | not measured | skipped |" in text
    assert "| pick, 8 nodes | 57 ns | 1,673 ns | 29.2x |" in text
    assert "| storm: all re-dispatched after | 8.30 s |" in text
    assert "wrk not installed: apt-get install wrk" in text
    assert "![storm-assignments.png](storm-assignments.png)" in text
    assert "| cores |" in text and "| sanic | 25 |" in text


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib not installed (the test extra has it)")
def test_plots_are_written(tmp_path):
    written = report.draw(MEASURED["series"], tmp_path)
    assert written == ["storm-assignments.png", "http-latency.png"]
    for name in written:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_http_servers_are_side_by_side_for_each_scenario():
    text = report.markdown(full_report(), [])
    keep_alive = text.index("### keep-alive, 1 worker")
    close = text.index("### Connection: close, 1 worker")
    assert keep_alive < close < text.index("## Figures")
    assert "| get-tcp-ip, fast path | 80,000 | 1.00 ms | 4.00x | 0.50x |" in text
    assert "| get-tcp-ip, plain route | 18,000 | 9.50 ms | 0.90x | 0.11x |" in text
    assert "| bare Sanic | 20,000 | 3.50 ms | 1.00x | 0.12x |" in text
    assert "| nginx | 160,000 | 0.50 ms | 8.00x | 1.00x |" in text
    # no nginx in that scenario: no ratio to it
    assert "| get-tcp-ip, fast path | 12,000 | 8.00 ms | 1.50x | - |" in text[close:]
    assert "The fast path answers 4.44x the plain Sanic route's requests/s." in text
    assert "`wrk -t1 -c64 -d2s -H 'Connection: close' URL`" in text
    assert "shows the client's limit, not its own" in text
    # the figures the tables show are not listed again
    assert "HTTP keep-alive, 1 worker: bare Sanic: requests/s" not in text


def test_without_plots_the_report_says_how_to_get_them():
    assert "pip install -e '.[test]'" in report.markdown(full_report(), [])

"""The benchmark report: its Markdown and plots from a run's figures (no benchmark run)."""

import importlib.util

import pytest

from bench import report

MEASURED = {
    "core": [{"case": "pick, 8 nodes", "compiled_ns": 57.2, "reference_ns": 1673.0,
              "ratio": 29.25}],
    "figures": [{"name": "storm: all re-dispatched after", "value": 8.3, "unit": "s"},
                {"name": "get-tcp-ip, 1 worker(s): requests/s", "value": 20679.0,
                 "unit": "req/s"}],
    "targets": [{"target": "pick <= 100 ns", "value": 57.2, "unit": "ns", "met": True},
                {"target": "ratio >= 0.9", "value": 0.82, "unit": "x", "met": False},
                {"target": "imnode 10k", "value": None, "unit": "", "met": None}],
    "skipped": [{"benchmark": "bench/test_dispatcher.py::test_http[1]",
                 "reason": "wrk not installed: apt-get install wrk"}],
    "series": {
        "storm: assignments per node": {"bucket_s": 0.25, "weights": {"s1": 3, "s2": 1},
                                        "per_node": {"s1": [0, 30, 15], "s2": [0, 10, 5]},
                                        "refusals": [0.1]},
        "latency percentiles, 1 worker(s)": {"get-tcp-ip": [[50, 1.2], [99, 4.0]],
                                             "bare Sanic": [[50, 1.0], [99, 3.5]]},
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
    assert "| get-tcp-ip, 1 worker(s): requests/s | 20,679 req/s |" in text
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


def test_without_plots_the_report_says_how_to_get_them():
    assert "pip install -e '.[test]'" in report.markdown(full_report(), [])

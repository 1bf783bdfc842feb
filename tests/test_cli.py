"""The console scripts run as installed programs."""

import subprocess
import sys


def run(*args):
    command = [sys.executable, "-m", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_selfcheck_passes_and_reports_the_compiled_core():
    result = run("dispatcher", "selfcheck")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "core_ext implementation: compiled" in result.stdout
    assert "a a b a c a a (nginx order)" in result.stdout
    assert "compiled == reference" in result.stdout
    assert "(core_ext._fastpath): 4 request heads read as its twin reads them" in result.stdout
    assert result.stdout.rstrip().endswith("selfcheck passed")


def test_unknown_command_is_a_usage_error():
    result = run("dispatcher", "frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_both_programs_report_their_version():
    for program in ("dispatcher", "imnode"):
        result = run(program, "--version")
        assert result.returncode == 0 and result.stdout.split()[-1] == "0.1.0", result

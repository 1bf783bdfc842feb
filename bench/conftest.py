"""Prints the compiled-vs-reference table and fails the run when a speed target is missed."""

from bench import targets


def pytest_terminal_summary(terminalreporter):
    if not targets.MEDIANS:
        return
    lines, _ = targets.table()
    terminalreporter.section("selection core: medians and targets")
    for line in lines:
        terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    if targets.MEDIANS and exitstatus == 0 and not targets.table()[1]:
        session.exitstatus = 1

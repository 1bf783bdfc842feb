"""The demo's children live no longer than the demo. On Linux each asks the kernel for a
SIGKILL when its parent dies (PR_SET_PDEATHSIG), so a `kill -9` of the demo leaves no
nats-server, imnode or dispatcher behind. Each also carries `MARK` in its command line,
so `pkill -f imdispatch-demo-child` finds every one where that signal does not exist.

The kernel sends the signal when the *thread* that forked the child ends, not the
process: the demo spawns its children from its main thread only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

MARK = "imdispatch-demo-child"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` that makes the child die with this process;
    None where there is no prctl (not Linux): the children then outlive a SIGKILL."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before the line above took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return in_child


def end_with_parent(parent: int) -> None:
    """In a process started by `parent` from its main thread (e.g. a multiprocessing
    initializer): be sent SIGTERM when the parent dies, at once if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def python_argv(*args: str) -> list[str]:
    """This Python running `args`, marked as a child of the demo (`-X` options are free
    for such use: the program sees them only in `sys._xoptions`)."""
    return [sys.executable, "-X", MARK, *args]

"""Processes that pick from one shared ledger at the same moment (for the tests of its
atomic counts): spawned, each set up, then all released together by a barrier, since a
spawned process takes far longer to start than to fill a node, and without the barrier
they would pick one after the other and never race."""

import multiprocessing
from collections import Counter


def race(target, args: tuple, processes: int, timeout: float = 120) -> Counter:
    """Run `target(*args, ready, results)` in `processes` spawned processes; each waits
    on the barrier `ready` once set up and puts a Counter of its picks on `results`.
    Returns their sum."""
    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(processes + 1), context.Queue()
    workers = [context.Process(target=target, args=(*args, ready, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    ready.wait(timeout=timeout)
    totals = Counter()
    for _ in workers:
        totals.update(results.get(timeout=timeout))
    for worker in workers:
        worker.join(timeout=10)
    return totals

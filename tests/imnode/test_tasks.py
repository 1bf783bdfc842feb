"""Stopping background tasks: a task that swallowed a cancellation still ends."""

import asyncio

from imnode.tasks import cancel_and_wait


def test_a_task_that_swallows_one_cancellation_is_cancelled_again():
    swallowed = []

    async def stubborn():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:  # what 3.11's wait_for does in a race
            swallowed.append(True)
        await asyncio.sleep(60)

    async def main():
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        # a bound for the test only: the old cancel_and_wait waited here forever
        await asyncio.wait_for(cancel_and_wait(task, None), 10)
        return task

    task = asyncio.run(main())
    assert swallowed == [True] and task.cancelled()


def test_what_a_task_raised_does_not_fail_the_stop():
    async def failing():
        raise RuntimeError("boom")

    async def main():
        task = asyncio.create_task(failing())
        await asyncio.sleep(0)
        await cancel_and_wait(task)
        return task

    task = asyncio.run(main())
    assert isinstance(task.exception(), RuntimeError)

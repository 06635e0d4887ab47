"""RouterWatch: which open streams a failed or changed router probe ends, and which it leaves.

The probe is a plain coroutine here (what `RouterClient.probe` returns: the router's instance
id, or an `APIError`); `tests/integration/test_faults.py` kills a real router stub under a
real frontend."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from frontend.errors import APIError, service_unavailable
from frontend.router_watch import RouterWatch


class Stream:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> bool:
        self.cancelled += 1
        return True


def probes(*answers: str | APIError | float) -> Callable[[], Awaitable[str]]:
    """A probe answering each call with the next item: an id, an error, or a delay (s)."""
    queue = list(answers)

    async def probe() -> str:
        answer = queue.pop(0)
        if isinstance(answer, APIError):
            raise answer
        if isinstance(answer, float):
            await asyncio.sleep(answer)
            return "late"
        return answer

    return probe


def test_a_failed_probe_ends_the_streams_opened_before_it() -> None:
    async def run() -> None:
        watch = RouterWatch(probes("router:1", service_unavailable("Stub process 'router_0_0' is not healthy.")))
        old = watch.track(Stream())
        assert await watch.check() == 0 and old.lost is None
        assert await watch.check() == 1
        assert old.lost is not None and "not healthy" in old.lost and old.stream.cancelled == 1
        watch.untrack(old)  # what RouterClient.generate does afterwards: harmless
        assert watch.ended == 1

    asyncio.run(run())


def test_a_new_instance_id_ends_the_old_streams_and_a_same_id_nothing() -> None:
    async def run() -> None:
        watch = RouterWatch(probes("router:1", "router:1", "router:2", "router:2"))
        first = watch.track(Stream())
        assert await watch.check() == 0 and await watch.check() == 0
        assert await watch.check() == 1 and first.lost == "the router model was restarted"
        later = watch.track(Stream())
        assert await watch.check() == 0 and later.lost is None and later.stream.cancelled == 0

    asyncio.run(run())


def test_a_slow_probe_ends_nothing() -> None:
    async def run() -> None:
        watch = RouterWatch(probes(0.5), timeout_s=0.05)
        entry = watch.track(Stream())
        assert await watch.check() == 0 and entry.lost is None

    asyncio.run(run())


def test_streams_opened_after_the_failing_probe_was_sent_are_left_open() -> None:
    async def run() -> None:
        gate = asyncio.Event()

        async def probe() -> str:
            await gate.wait()
            raise service_unavailable("model 'router' is not ready")

        watch = RouterWatch(probe)
        before = watch.track(Stream())
        checking = asyncio.ensure_future(watch.check())
        await asyncio.sleep(0.01)
        after = watch.track(Stream())  # reached the new stub, or got the dead one's error
        gate.set()
        assert await checking == 1
        assert before.lost is not None and after.lost is None

    asyncio.run(run())


def test_the_background_task_probes_only_while_streams_are_open() -> None:
    async def run() -> None:
        calls = []

        async def probe() -> str:
            calls.append(1)
            return "router:1"

        watch = RouterWatch(probe, interval_s=0.01)
        watch.start()
        await asyncio.sleep(0.1)
        assert not calls
        entry = watch.track(Stream())
        await asyncio.sleep(0.1)
        assert calls
        watch.untrack(entry)
        await watch.close()

    asyncio.run(run())

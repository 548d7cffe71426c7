"""A controllable world of supervised children for the runtime's tests.

Each child started from a :class:`World` spec is a task that registers itself
in ``world.alive`` while it really runs, logs its starts and stops, and exits
(normally or by raising) when the test tells its current incarnation to.
"""

from __future__ import annotations

import trio
import trio.testing

from runestone.runtime import ChildSpec, Shutdown


class Crash(Exception):
    """A child's deliberate failure."""


class Control:
    """What a child passes to ``task_status.started``: the test's handle on that incarnation."""

    def __init__(self, world: World, id: str) -> None:
        self.world = world
        self.id = id
        self._event = trio.Event()
        self._error: BaseException | None = None
        self.cancelled_at: float | None = None

    def exit(self) -> None:
        self._event.set()

    def crash(self, message: str = "crash") -> None:
        self._error = Crash(f"{self.id}: {message}")
        self._event.set()

    def shut_down(self) -> None:
        """Exit with OTP's reason ``shutdown``."""
        self._error = Shutdown(f"{self.id}: shutdown")
        self._event.set()

    async def wait(self) -> None:
        try:
            await self._event.wait()
        except trio.Cancelled:
            self.cancelled_at = trio.current_time()
            self.world.cancelled.append(self.id)
            raise
        if self._error is not None:
            raise self._error


class GracefulControl(Control):
    """Stops at once when asked."""

    def request_stop(self) -> None:
        self.world.stop_requests.append((self.id, trio.current_time()))
        self.exit()


class DeafControl(Control):
    """Hears a stop request and ignores it."""

    def request_stop(self) -> None:
        self.world.stop_requests.append((self.id, trio.current_time()))


class SlowControl(Control):
    """Finishes ``delay`` seconds after a stop request."""

    delay = 1000.0

    def request_stop(self) -> None:
        self.world.stop_requests.append((self.id, trio.current_time()))
        self.world.nursery.start_soon(self._exit_later)

    async def _exit_later(self) -> None:
        await trio.sleep(self.delay)
        self.exit()


class World:
    def __init__(self, nursery: trio.Nursery | None = None) -> None:
        self.nursery = nursery
        self.alive: dict[str, Control] = {}
        self.log: list[tuple[str, str]] = []
        self.cancelled: list[str] = []
        self.stop_requests: list[tuple[str, float]] = []
        self.fail_start: dict[str, int] = {}  # id -> how many next starts fail
        self.start_delay: dict[str, float] = {}  # id -> seconds each start takes before it succeeds or fails

    def spec(self, id: str, restart: str = "permanent", shutdown: float = 5.0, control: type[Control] = GracefulControl) -> ChildSpec:
        async def start(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            if self.start_delay.get(id):
                await trio.sleep(self.start_delay[id])
            if self.fail_start.get(id):
                self.fail_start[id] -= 1
                self.log.append(("failed", id))
                raise Crash(f"{id}: cannot start")
            assert id not in self.alive, f"two incarnations of {id} at once"
            ctl = control(self, id)
            self.alive[id] = ctl
            self.log.append(("start", id))
            try:
                task_status.started(ctl)
                await ctl.wait()
            finally:
                del self.alive[id]
                self.log.append(("stop", id))

        return ChildSpec(id=id, start=start, restart=restart, shutdown=shutdown)

    def take_log(self) -> list[tuple[str, str]]:
        log, self.log = self.log, []
        return log


async def _watchdog(limit: float) -> None:
    await trio.sleep(limit)
    raise AssertionError(f"test still blocked after {limit:g} s of clock time: a deadlock")


def run_with_watchdog(async_fn, *args, clock=None, instruments=()):
    """``trio.run`` that fails a test blocking forever instead of hanging the run.

    Under ``MockClock(autojump_threshold=0)`` a deadlock makes the clock jump
    straight to the watchdog, so it fails at once; on the real clock it takes
    a generous real limit. Use as ``pytest.mark.trio(run=run_with_watchdog)``.
    """

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watchdog, 1e6 if isinstance(clock, trio.testing.MockClock) else 30.0)
            result = await async_fn(*args)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main, clock=clock, instruments=list(instruments))

"""Where a selection's time goes: the stages a method reports (``scoring``, ``greedy``) to
a clock a benchmark installs. Without a clock (the default) a stage costs one lookup.

An engine's benchmark installs a :class:`StageClock` around the selections it times
(:func:`clocked`); the methods mark their stages with :func:`stage`. What a selection
spends outside its stages (gathering tokens, checks, the kept runs' assembly, and the work
of a method that marks none) is its total less the stages.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class StageClock:
    """Seconds per stage name; ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs on
    both sides of every stage, so that a device's queued work lands in its stage."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.synchronize = synchronize

    def sync(self) -> None:
        if self.synchronize is not None:
            self.synchronize()


_CLOCK: ContextVar[StageClock | None] = ContextVar("zooprune_stage_clock", default=None)


@contextmanager
def clocked(clock: StageClock) -> Iterator[StageClock]:
    """Stages inside the block are timed into ``clock``."""
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` of the clock installed (nothing without one)."""
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    clock.sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        clock.sync()
        clock.seconds[name] += time.perf_counter() - start

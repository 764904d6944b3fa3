"""asyncio on uvloop for every fmplex process."""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Awaitable[T]) -> T:
    """Run a coroutine to completion on a fresh uvloop event loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)

"""Bounded waiting for asynchronous outcomes in tests."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import pytest


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    *,
    what: str = "condition",
    every: float = 0.01,
) -> None:
    """Poll ``predicate`` (sync or async) until true; fail the test after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(every)
    except TimeoutError:
        pytest.fail(f"not within {timeout}s: {what}")

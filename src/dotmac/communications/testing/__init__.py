"""Helpers for testing code that uses dotmac-communications."""

from __future__ import annotations

from ._clock import FakeClock

__all__ = ["FakeClock"]

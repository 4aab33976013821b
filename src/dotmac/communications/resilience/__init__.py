"""Retry, circuit breaking and rate limiting, shared by every part of the library."""

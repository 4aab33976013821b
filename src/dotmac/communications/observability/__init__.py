"""Metrics, tracing, structured logging and health checks."""

"""A real OTLP/HTTP receiver on 127.0.0.1 that decodes protobuf exports and keeps what it got."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class ReceivedSpan:
    """One span as decoded from an ExportTraceServiceRequest."""

    name: str
    kind: int
    trace_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int


@dataclass
class ReceivedMetric:
    """One metric as decoded from an ExportMetricsServiceRequest."""

    name: str
    unit: str
    resource: dict[str, Any]


@dataclass
class _Store:
    spans: list[ReceivedSpan] = field(default_factory=list)
    metrics: list[ReceivedMetric] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attrs(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


class OtlpReceiver:
    """Accepts ``POST /v1/metrics`` and ``POST /v1/traces`` (protobuf) on a free loopback port.

    Use as a context manager; ``endpoint`` is the base URL to configure exporters with.
    """

    def __init__(self) -> None:
        self._store = _Store()
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path == "/v1/traces":
                    receiver._on_traces(body)
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    receiver._on_metrics(body)
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                """Keep the test output quiet."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        """Base URL, ``http://127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _on_traces(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        spans = [
            ReceivedSpan(
                name=sp.name,
                kind=sp.kind,
                trace_id=sp.trace_id.hex(),
                attributes=_attrs(sp.attributes),
                resource=_attrs(rs.resource.attributes),
                status_code=sp.status.code,
            )
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for sp in ss.spans
        ]
        with self._cond:
            self._store.paths.append("/v1/traces")
            self._store.spans.extend(spans)
            self._cond.notify_all()

    def _on_metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest.FromString(body)
        metrics = [
            ReceivedMetric(name=m.name, unit=m.unit, resource=_attrs(rm.resource.attributes))
            for rm in request.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        ]
        with self._cond:
            self._store.paths.append("/v1/metrics")
            self._store.metrics.extend(metrics)
            self._cond.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        with self._cond:
            return list(self._store.spans)

    @property
    def metrics(self) -> list[ReceivedMetric]:
        """Every metric received so far (one entry per metric per export)."""
        with self._cond:
            return list(self._store.metrics)

    @property
    def paths(self) -> list[str]:
        """Paths of every accepted export request, in order."""
        with self._cond:
            return list(self._store.paths)

    def wait_for_span(self, name: str, timeout: float = 5.0) -> ReceivedSpan:
        """Return the first span called ``name``, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for received in self._store.spans:
                    if received.name == name:
                        return received
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [s.name for s in self._store.spans]
                    raise TimeoutError(f"no span {name!r} within {timeout}s; got {seen}")
                self._cond.wait(remaining)

    def wait_for_metric(self, name: str, timeout: float = 5.0) -> ReceivedMetric:
        """Return the first metric called ``name``, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for received in self._store.metrics:
                    if received.name == name:
                        return received
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [m.name for m in self._store.metrics]
                    raise TimeoutError(f"no metric {name!r} within {timeout}s; got {seen}")
                self._cond.wait(remaining)

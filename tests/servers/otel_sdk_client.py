#!/usr/bin/env python3
"""An application instrumented with the real OpenTelemetry Python SDK, for the kspan tests.

Usage: otel_sdk_client.py PORT PATH

Configures a TracerProvider whose exporter (SimpleSpanProcessor, so spans are exported as they
end) writes each finished span as one line ``SDK_SPAN {json}`` on stdout, with trace_id (32 hex),
span_id (16 hex), parent_span_id (16 hex or null), name, kind and sampled.

Prints ``READY`` (flushed) and blocks until a line arrives on stdin, so the test can start kspan
with this process's pid selected before any traffic. Then, inside a CLIENT span, injects the
W3C traceparent with the SDK's TraceContextTextMapPropagator into the headers of one
http.client GET 127.0.0.1:PORT PATH (a new connection), reads the response, ends the span and
prints

  TRACEPARENT <the injected header>
  STATUS <code>
  BODY <response body>
  SDK_SPAN {...}
"""

import http.client
import json
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator


class JsonLinesExporter(SpanExporter):
    def export(self, spans):
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            record = {
                "trace_id": format(ctx.trace_id, "032x"),
                "span_id": format(ctx.span_id, "016x"),
                "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
                "name": span.name,
                "kind": span.kind.name,
                "sampled": bool(ctx.trace_flags.sampled),
            }
            sys.stdout.write("SDK_SPAN " + json.dumps(record) + "\n")
            sys.stdout.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


def main():
    if len(sys.argv) != 3:
        sys.stderr.write("usage: otel_sdk_client.py PORT PATH\n")
        return 2
    port = int(sys.argv[1])
    path = sys.argv[2]

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter()))
    tracer = provider.get_tracer("kspan-e2e-sdk-client")
    propagator = TraceContextTextMapPropagator()

    sys.stdout.write("READY\n")
    sys.stdout.flush()
    sys.stdin.readline()

    with tracer.start_as_current_span("GET", kind=trace.SpanKind.CLIENT):
        headers = {}
        propagator.inject(headers)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        conn.close()
        sys.stdout.write("TRACEPARENT %s\n" % headers.get("traceparent", ""))
        sys.stdout.write("STATUS %d\n" % resp.status)
        sys.stdout.write("BODY %s\n" % body)
        sys.stdout.flush()
    provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

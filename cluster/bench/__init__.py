"""The ``splitserve bench`` load generator: datasets, arrival processes, an
async driver over HTTP/gRPC/in-process backends, the serving statistics of
docs/benchmarks.md, and reports (table, JSON record, plot)."""
